"""tools/plot_loss.py reads pretrain_vlgpt.py's console lines and writes a PNG."""

import os

from pretrain_helpers import PY, run_script

LOG = """launcher: torchrun (rank 0 of 2, local rank 0, master 127.0.0.1:1234, node rank 0)
iteration        1/3 | consumed samples: 4 | lm loss: 5.50000000E+00 | visual loss: 2.00000000E-01 | learning rate: 1.0E-03
iteration        2/3 | consumed samples: 8 | lm loss: 4.25000000E+00 | visual loss: 1.50000000E-01 | learning rate: 1.0E-03
validation at iteration 2 | lm loss: 4.00000000E+00 | lm PPL: 5.4598E+01 | visual loss: 1.40000000E-01
iteration        3/3 | consumed samples: 12 | lm loss: 3.00000000E+00 | visual loss: 1.00000000E-01 | learning rate: 1.0E-03
"""


def test_plot_loss_writes_png(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(LOG)
    out = run_script([PY, "tools/plot_loss.py", "--log", log, "--output", tmp_path / "loss.png"])
    assert "3 logged iterations up to 3; lm loss 5.500 -> 3.000, visual loss 0.2000 -> 0.1000" in out
    assert open(tmp_path / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "train.log"]


def test_plot_loss_refuses_a_log_without_iterations(tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("nothing here\n")
    out = run_script([PY, "tools/plot_loss.py", "--log", log, "--output", tmp_path / "loss.png"], expect=1)
    assert "no 'iteration N/M | ... lm loss: ...' lines" in out
    assert not os.path.exists(tmp_path / "loss.png")
