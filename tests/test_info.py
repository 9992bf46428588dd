"""Model size and cost are computed from the models and agree with the paper."""
import json

import pytest

from overlock.cli import main
from overlock.profile import model_summary

# paper: params (M) of the deploy form without the aux head, to 0.1 M as the issue states them; GFLOPs at 224
PAPER = {"overlock_xt": (16.4, 2.6), "overlock_t": (33.5, 5.5), "overlock_s": (56.2, 9.7), "overlock_b": (94.9, 16.7)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_flops_match_the_paper(name):
    s = model_summary(name)
    params, gflops = PAPER[name]
    assert abs(s["params_m"] - params) < 0.1
    assert s["params_train_m"] > s["params_m"]  # dilated branches merge away in the deploy form
    assert abs(s["gmacs"] - gflops) / gflops < 0.03
    assert s["gmacs_total"] > s["gmacs"]


@pytest.mark.slow
def test_info_command_json(capsys):
    assert main(["info", "--model", "overlock_xt", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["model"] == "overlock_xt" and abs(rows[0]["params_m"] - 16.45) < 0.01


def test_info_command_rejects_unknown_model(capsys):
    assert main(["info", "--model", "overlock_q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("overlock info: error: unknown model 'overlock_q'") and "overlock_xt" in err
