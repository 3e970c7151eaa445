"""Evaluation harness: edit-case files, metrics, baselines and the runner behind `kbctl eval`.

Modules (heavy ones import torch; `cases`, `hparams`, `metrics` and `errors` do not):

* `cases`     – the JSON Lines edit-case format: `EditCase`, `load_cases`, `write_cases`.
* `easyvqa`   – builds a case file and a reference pool from the easy-VQA TRAIN split.
* `readers`   – converts MMEdit E-VQA and OKEDIT records to the case format.
* `metrics`   – Acc, T-Gen, I-Gen, Loc, HM in two flavours (exact match and token level).
* `hparams`   – one frozen config per baseline; `KEY=VALUE` parsing and validation.
* `readout`   – greedy answers and teacher-forced top-k tokens of a backbone.
* `methods`   – the `EditMethod` interface and BalancEdit / GRACE through `editor.Editor`.
* `finetune`, `incontext`, `mend` – the FT, IKE and MEND baselines.
* `runner`    – `run_eval`: independent and sequential protocols, the JSON report.
* `plot`      – metrics against the number of edits (matplotlib, imported lazily).

Build a development file and evaluate::

    python -m editor.eval build-easyvqa --out bench/dev --seed 0
    kbctl eval bench/dev/cases.jsonl --method balancedit --json report.json
"""
