"""Everything that knows about Ray, files and users."""
