"""``ctp zeroshot`` end to end on a tiny model."""

import json

from ctp.cli import main


def test_cli_compare_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "zs.json"
    rc = main(["-q", "zeroshot", "--model", tiny_dir, "--tasks", "piqa,mmlu_hs_european_history", "--limit", "4",
               "--batch-size", "4", "--compare", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["tasks"] == ["piqa", "mmlu_hs_european_history"] and res["limit"] == 4
    got = [(r["prompt"], r["task"], r["n"]) for r in res["results"]]
    assert got == [("none", "piqa", 4), ("none", "mmlu_hs_european_history", 4),
                   ("hard", "piqa", 4), ("hard", "mmlu_hs_european_history", 4)]
    assert all(0 <= r["acc"] <= 1 and r["acc_stderr"] is not None for r in res["results"])
    assert [r["prompt_tokens"] > 0 for r in res["results"]] == [False, False, True, True]
    table = capsys.readouterr().out
    assert "acc_norm ± se" in table and "±" in table.splitlines()[2]


def test_cli_unknown_task_is_a_one_line_error(tiny_dir, capsys):
    assert main(["zeroshot", "--model", tiny_dir, "--tasks", "piqa,winograd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown zero-shot task 'winograd'" in err[0] and "arc_challenge" in err[0]
