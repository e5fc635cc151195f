"""The driver prints, prefixed with the run's name, every line the controller's callback writes, in order."""

from __future__ import annotations

import os

from medood.platform.progress import ProgressPrinter, progress_line


def test_every_reported_line_is_printed_once_in_order_even_just_before_close(capsys):
    printer = ProgressPrinter("run")
    reports = [
        {"epoch": 1, "epochs_total": 2, "stage": "train", "train_loss": 0.5, "val_auroc": 0.7, "epoch_time_s": 2.0},
        {"epoch": 2, "epochs_total": 2, "stage": "train", "train_loss": 0.25, "val_auroc": 0.8, "epoch_time_s": 2.0},
    ]
    for m in reports:  # what Ray Train's controller calls; the last one right before the run ends
        printer.callback.after_report(None, [m], None)
    printer.callback.after_report(None, [], None)  # a report without metrics prints nothing
    printer.close()
    out = capsys.readouterr().out.splitlines()
    assert out == [f"[run] {progress_line(m)}" for m in reports]
    assert out[0] == "[run] epoch 1/2  train  loss 0.5  val_auroc 0.700  2.0 s/epoch  eta 2 s"
    assert not os.path.exists(printer.callback.sink)  # the line file is removed with the printer


def test_a_training_free_fit_is_one_line():
    assert progress_line({"epoch": 0, "epochs_total": 0, "val_auroc": 0.81}) == "fit (no training)  val_auroc 0.810"
