"""Experiment trackers: TensorBoard event files, an offline W&B run and a trackio project hold the
scalars of metrics.jsonl and the resolved configuration, read back with each tool's own reader."""

import glob
import json
import os

import pytest

from tests.corpus import TEXT
from tests.training.test_train import quiet, toy_config
from xlstm_eqx.training import read_metrics, train


def _wandb_records(path):
    """The protobuf records of a `.wandb` file (a LevelDB-format log of 32 KiB blocks after a
    7-byte header), decoded with wandb's own `Record` message."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-filled tail
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf + payload if kind == 4 else payload)
            buf = b""
            yield record
        elif kind in (2, 3):  # FIRST, MIDDLE
            buf += payload


def test_trackers_hold_the_metrics_and_config(tmp_path):
    for name in ("tensorboard", "wandb", "trackio"):
        pytest.importorskip(name)
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    cfg = toy_config(
        tmp_path, str(data), steps=4, eval_every=2, tracker="tensorboard,wandb,trackio"
    )
    cfg.tracker_project = "xlstm-eqx-test"
    train(cfg, log=quiet)
    rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with open(os.path.join(cfg.out, "config.json")) as f:
        config = json.load(f)

    # TensorBoard: every scalar of every row at its step, the config as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(cfg.out, "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "bits_per_byte"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = {r["step"]: r[key] for r in rows if key in r}
        assert got == pytest.approx(want, rel=1e-6), key
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`").removeprefix("json\n")) == config

    # W&B, offline: the run's history records and its config
    (run_file,) = glob.glob(os.path.join(cfg.out, "wandb", "offline-run-*", "run-*.wandb"))
    history, run = {}, None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history[items["_step"]] = items
        elif kind == "run":
            run = record.run
    assert sorted(history) == [1, 2, 3, 4]
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "eval_loss", "bits_per_byte"):
            if key in r:
                assert history[r["step"]][key] == pytest.approx(r[key], rel=1e-6)
    assert run.project == "xlstm-eqx-test" and run.display_name == "run"
    cfg_keys = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert cfg_keys["train"]["steps"] == 4 and cfg_keys["model_kind"] == "toy"
    with open(os.path.join(cfg.out, "trackers.json")) as f:
        assert json.load(f)["wandb_id"] == run.run_id

    # trackio: its own storage API
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("xlstm-eqx-test", "run")
    assert [log["step"] for log in logs] == [1, 2, 3, 4]
    for log, r in zip(logs, rows, strict=True):
        assert log["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert ("bits_per_byte" in log) == ("bits_per_byte" in r)
    assert SQLiteStorage.get_run_config("xlstm-eqx-test", "run")["train"] == config["train"]


def test_unknown_or_missing_tracker_fails_before_writing(tmp_path, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        train(toy_config(tmp_path, str(data), tracker="tensorboard,mlflow"), log=quiet)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(ImportError, match=r"--tracker wandb needs .*xlstm_eqx\[trackers\]"):
        train(toy_config(tmp_path, str(data), tracker="wandb"), log=quiet)
    assert not (tmp_path / "run").exists()
