"""TOML config: defaults, one-line errors naming the key, --set overrides, paths, round trip."""

from pathlib import Path

import pytest

from minilora.train.config import Config, ConfigError, config_from_dict, load_config, parse_override

MINIMAL = '[model]\npath = "model"\n\n[data]\ntrain_file = "train.tsv"\n'


def write(tmp_path, text, name="run.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def base(**sections) -> dict:
    d = {"model": {"path": "m"}, "data": {"train_file": "t.tsv"}}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def test_minimal_toml_gets_working_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.path == str(tmp_path / "model") and cfg.data.train_file == str(tmp_path / "train.tsv")
    assert cfg.model.task == "causal-lm" and cfg.data.kind == "instructions"  # kind follows task
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16.0, 0.05, None)
    assert cfg.quant.method == "none" and cfg.quant.double_quant and cfg.quant.blocksize == 64
    assert (cfg.data.max_length, cfg.data.validation_fraction, cfg.data.group_by_length) == (256, 0.05, True)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.grad_accum, t.lr, t.schedule, t.max_grad_norm) == (1, 8, 1, 2e-4, "linear", 1.0)
    assert (t.device, t.precision, t.metric_for_best, t.max_steps) == ("auto", "auto", "auto", None)
    assert cfg.output.dir == str(Path.cwd() / "runs" / "minilora") and cfg.output.save_total_limit is None
    assert config_from_dict(base()).output.dir == "runs/minilora"  # no file, no resolution
    cls = config_from_dict(base(model={"task": "sequence-classification"}))
    assert cls.data.kind == "classification"


def test_full_config_types(tmp_path):
    text = MINIMAL + '''
[lora]
r = 16
alpha = 32          # an integer is fine for a float key
target_modules = "all-linear"
modules_to_save = ["classifier"]
[data]
'''.replace("[data]\n", "") + '''
[train]
lr = 1e-3
max_steps = 100
device = "cuda:1"
[quant]
method = "nf4"
'''
    cfg = load_config(write(tmp_path, text))
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float) and cfg.lora.target_modules == "all-linear"
    assert cfg.lora.modules_to_save == ["classifier"] and cfg.train.max_steps == 100
    assert cfg.train.device == "cuda:1" and cfg.quant.method == "nf4"
    idx = config_from_dict(base(model={"task": "sequence-classification"}, data={"text_column": 1, "label_column": 0}))
    assert (idx.data.text_column, idx.data.label_column) == (1, 0)  # column indexes, headerless files


@pytest.mark.parametrize("d, pattern", [
    ({"model": {"path": "m"}, "data": {"train_file": "t"}, "trian": {}},
     r"unknown section 'trian'; did you mean 'train'\? valid: model, lora, quant, data, train, output"),
    (base(train={"learning_rate": 1e-3}), r"unknown key in \[train\] 'learning_rate'.*valid: epochs, max_steps"),
    (base(train={"lr_": 1e-3}), r"did you mean 'lr'\?"),
    (base(train={"lr": "fast"}), r"train.lr: expected number, got 'fast' \(str\)"),
    (base(train={"epochs": 1.5}), r"train.epochs: expected integer, got 1.5"),
    (base(train={"epochs": True}), r"train.epochs: expected integer, got True"),
    (base(lora={"target_modules": ["q", 3]}), r"lora.target_modules: expected a list of strings or string"),
    (base(model={"gradient_checkpointing": "yes"}), r"model.gradient_checkpointing: expected boolean"),
    (base(model={"gradient_checkpointing": True, "checkpoint_every": 0}),
     r"model.checkpoint_every must be an integer >= 1, got 0"),
    (base(model={"checkpoint_every": 2}), r"model.checkpoint_every = 2 only applies with gradient checkpointing; "
                                          r"set model.gradient_checkpointing = true"),
    (base(train={"schedule": "cosnie"}), r"train.schedule: 'cosnie' is not one of 'linear', 'cosine', 'constant'"),
    (base(model={"task": "seq-cls"}), r"model.task: 'seq-cls' is not one of 'causal-lm', 'sequence-classification'"),
    (base(train={"device": "tpu"}), r"train.device: 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    ({"data": {"train_file": "t"}}, r"model.path is required"),
    ({"model": {"path": "m"}, "data": {}}, r"data.train_file is required: add `train_file = "),
    ({"model": {"path": "m"}}, r"data.train_file is required"),
    (base(lora={"r": 0}), r"lora.r must be an integer >= 1, got 0"),
    (base(lora={"dropout": 1.5}), r"lora.dropout must be in \[0, 1\), got 1.5"),
    (base(train={"lr": 0}), r"train.lr must be > 0"),
    (base(data={"kind": "classification"}), r"data.kind = 'classification' does not fit model.task = 'causal-lm'"),
    (base(train={"metric_for_best": "accuracy"}), r"train.metric_for_best = 'accuracy' needs a classification"),
    (base(train={"warmup_steps": 10, "warmup_ratio": 0.1}), r"warmup_steps and train.warmup_ratio are both set"),
    ({"model": "m", "data": {"train_file": "t"}}, r"\[model\] must be a table"),
])
def test_errors_are_one_line_and_name_the_key(d, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        config_from_dict(d)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML") as info:
        load_config(write(tmp_path, "[model]\npath = \n", "bad.toml"))
    assert "\n" not in str(info.value)


def test_set_overrides_parse_as_toml_or_bare_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path / "configs", MINIMAL)
    cfg = load_config(p, ["train.lr=1e-3", 'lora.target_modules=["query","value"]', "data.train_file=foo.tsv",
                          "train.max_steps = 50", "model.gradient_checkpointing=true", "output.dir=2024",
                          "lora.modules_to_save=[\"classifier\"]", "data.kind=text"])
    assert cfg.train.lr == 1e-3 and cfg.lora.target_modules == ["query", "value"] and cfg.train.max_steps == 50
    assert cfg.data.train_file == str(tmp_path / "foo.tsv")  # --set paths: relative to the cwd
    assert cfg.output.dir == str(tmp_path / "2024") and cfg.model.gradient_checkpointing is True
    assert cfg.data.kind == "text" and cfg.lora.modules_to_save == ["classifier"]
    assert load_config(p, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    assert load_config(p, ["lora.target_modules=.*(q|v)_proj"]).lora.target_modules == ".*(q|v)_proj"
    assert load_config(p, ["train.max_steps=none"]).train.max_steps is None
    assert parse_override("train.seed=3") == ("train", "seed", 3)
    for bad, pattern in [("train.lr", r"expected section.key=value"), ("lr=1", r"expected section.key=value"),
                         ("train.seed=abc", r"train.seed: expected integer, got 'abc'"),
                         ("train.lrr=1", r"did you mean 'lr'"), ("optim.lr=1", r"unknown section 'optim'")]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(p, [bad])


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("label\tsentence\n1\tok\n")
    (tmp_path / "model").mkdir()
    p = write(tmp_path / "configs" / "exp", '[model]\npath = "../../model"\n[data]\ntrain_file = '
              '"../../data/train.tsv"\nvalidation_file = "/abs/dev.tsv"\n[output]\ndir = "out"\n')
    cfg = load_config(p)
    assert cfg.data.train_file == str(tmp_path / "data" / "train.tsv")
    assert cfg.model.path == str(tmp_path / "model") and cfg.output.dir == str(tmp_path / "configs" / "exp" / "out")
    assert cfg.data.validation_file == "/abs/dev.tsv"
    with pytest.raises(ConfigError, match=r"data.validation_file: not found: /abs/dev.tsv"):
        cfg.validate_paths()
    cfg.data.validation_file = None
    cfg.validate_paths()
    cfg.data.train_file = str(tmp_path / "gone.tsv")
    with pytest.raises(ConfigError, match=r"data.train_file: not found: .*gone.tsv"):
        cfg.validate_paths()


def test_round_trip_to_dict_and_toml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ['lora.target_modules=["q_proj","v_proj"]', "train.eval_every=20",
                                                 "data.validation_file=dev.tsv", "train.lr=3e-4"])
    d = cfg.to_dict()
    assert "max_steps" not in d["train"] and d["train"]["eval_every"] == 20  # unset keys left out
    assert config_from_dict(d) == cfg and isinstance(cfg, Config)
    written = write(tmp_path / "elsewhere", cfg.to_toml(), "resolved.toml")
    assert load_config(written) == cfg  # absolute paths: reloads from any folder
