"""The schema and the typed config agree; typos and bad names are errors that list what is valid."""

from __future__ import annotations

import dataclasses

import jsonschema
import pytest
import yaml

from conftest import REPO
from precip_cvae import config as C

SCHEMA = yaml.safe_load((REPO / "src" / "precip_cvae" / "config.schema.yaml").read_text())


def _section(*path):
    node = SCHEMA["properties"]
    for i, key in enumerate(path):
        node = node[key]
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].split("/")[-1]]
        if i < len(path) - 1:
            node = node["properties"]
    return node["properties"]


def _defaults(props):
    return {k: v["default"] for k, v in props.items() if "default" in v and v.get("type") != "object"}


@pytest.mark.parametrize(
    "path, cls, skip",
    [
        (("demo",), C.DemoConfig, {"enabled"}),
        (("preprocess",), C.PreprocessConfig, {"split", "min_split_days"}),
        (("preprocess", "min_split_days"), C.MinSplitDays, set()),
        (("preprocess", "split"), C.SplitConfig, set()),
        (("events",), C.EventsConfig, set()),
        (("model",), C.ModelConfig, set()),
        (("train", "loss"), C.LossConfig, {"preset"}),
        (("evaluate",), C.EvaluateConfig, {"bootstrap"}),
        (("evaluate", "bootstrap"), C.BootstrapConfig, set()),
        (("generate",), C.GenerateConfig, set()),
        (("downstream",), C.DownstreamConfig, set()),
    ],
)
def test_schema_defaults_equal_dataclass_defaults(path, cls, skip):
    schema_defaults = {k: v for k, v in _defaults(_section(*path)).items() if k not in skip}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(schema_defaults) == set(fields) - skip
    built = cls.from_dict({})
    raw = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for key, value in schema_defaults.items():
        expected = raw.get(key, getattr(built, key))
        got = tuple(value) if isinstance(value, list) else value
        assert got == expected, f"{'.'.join(path)}.{key}: schema {value!r} != dataclass {expected!r}"


def test_repository_configs_validate():
    for path in (REPO / "config").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


def test_schema_rejects_typos_and_wrong_types():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["events"]["percentil"] = 95
    with pytest.raises(jsonschema.ValidationError, match="percentil"):
        jsonschema.validate(cfg, SCHEMA)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["events"]["percentile"] = "high"
    with pytest.raises(jsonschema.ValidationError, match="'high' is not of type 'number'"):
        jsonschema.validate(cfg, SCHEMA)


def test_dataclasses_reject_unknown_keys_and_names():
    with pytest.raises(C.ConfigError, match=r"unknown key\(s\) \['percentil'\]"):
        C.EventsConfig.from_dict({"percentil": 95})
    with pytest.raises(C.ConfigError, match=r"valid names are \['medium', 'seed', 'small', 'tiny'\]"):
        C.ModelConfig(preset="huge")
    with pytest.raises(C.ConfigError, match="fractions"):
        C.SplitConfig(fractions=(0.5, 0.5, 0.5))


def _sections():
    return [cls for cls in vars(C).values() if isinstance(cls, type) and issubclass(cls, C.Section)
            and cls is not C.Section]


def test_every_section_takes_exactly_the_keys_of_its_schema():
    assert len(_sections()) == 15
    for cls in _sections():
        keys = set(C.schema_node(cls.SCHEMA)["properties"]) - cls.WORKFLOW_ONLY
        assert {f.name for f in dataclasses.fields(cls)} - cls.INTERNAL == keys, cls.__name__
        # one from_dict (two sections add the preset that train.preset sets), one __post_init__
        assert "__post_init__" not in vars(cls), cls.__name__
        assert cls.from_dict.__func__ is C.Section.from_dict.__func__ or cls in (C.LossConfig, C.TrainConfig)


def test_a_section_built_directly_meets_the_schema_like_one_from_a_config_file():
    with pytest.raises(C.ConfigError, match=r"^evaluate.members: 0 is less than the minimum of 1"):
        C.EvaluateConfig(members=0)
    with pytest.raises(C.ConfigError, match=r"^evaluate.members: 0 is less than the minimum of 1"):
        C.EvaluateConfig.from_dict({"members": 0})
    # a nested section is named where it sits; an item of an array by its index
    with pytest.raises(C.ConfigError, match=r"^preprocess.split.method: unknown name 'random'; valid names are "
                                            r"\['contiguous', 'years', 'dates', 'kfold_years'\]"):
        C.PreprocessConfig.from_dict({"split": {"method": "random"}})
    with pytest.raises(C.ConfigError, match=r"^train.augment\[1\]: unknown name 'cutout'"):
        C.TrainConfig(augment=("flip", "cutout"))
    with pytest.raises(C.ConfigError, match=r"^data.predictors\[1\].variable: 5 is not of type 'string'"):
        C.DataConfig.from_dict({"target": {"paths": "t/*.nc", "variable": "pr"},
                                "predictors": [{"paths": "p/*.nc", "variable": "psl"}, {"paths": "p", "variable": 5}]})
    with pytest.raises(C.ConfigError, match=r"^data: needs 'target'"):
        C.DataConfig.from_dict({})
    with pytest.raises(C.ConfigError, match=r"^preprocess.predictor_aggregation: unknown name 'median'; valid names "
                                            r"are \['mean', 'min', 'max', 'sum'\] or null"):
        C.PreprocessConfig(predictor_aggregation="median")
    # what a schema cannot say stays a check of its own
    with pytest.raises(C.ConfigError, match="ensemble_members must be >= 2 when lambda_crps"):
        C.LossConfig(ensemble_members=1)
    assert C.LossConfig(ensemble_members=1, lambda_crps=0.0).n_prior == 0
    assert C.DemoConfig.from_dict({"enabled": True, "years": 2}).years == 2  # the workflow's switch is dropped
    with pytest.raises(C.ConfigError, match=r"^preprocess.split: expected a SplitConfig section, got None"):
        C.PreprocessConfig(split=None)
    import numpy as np

    assert C.EvaluateConfig(members=np.int64(8)).members == 8  # numpy numbers are numbers


def test_registries_and_enums_are_one_list():
    from precip_cvae import baselines, data, downstream, events, resources, transform

    assert tuple(C.MODEL_PRESETS) == C.schema_enum("model.preset")
    assert tuple(C.TRAIN_PRESETS) == tuple(C.LOSS_PRESETS) == C.schema_enum("train.preset")
    assert tuple(events.EVENT_CRITERIA) == C.schema_enum("events.criterion")
    assert tuple(downstream.LOSSES) == C.schema_enum("downstream.losses")
    assert tuple(data.AUGMENTATIONS) == C.schema_enum("train.augment")
    assert tuple(baselines.BASELINES) == C.schema_enum("evaluate.baselines")
    assert transform.TARGET_TRANSFORMS == C.schema_enum("preprocess.transform") == ("log1p", "sqrt", "none")
    for section in ("train", "evaluate", "generate", "downstream"):
        assert C.schema_enum(f"{section}.device") == resources.DEVICES
    assert set(C.EVALUATE_SAMPLING_KEYS) < set(C.schema_node("evaluate")["properties"])


def test_preset_values_fill_unset_fields_only():
    m = C.ModelConfig(preset="seed")
    assert (m.base_filters, m.d_y, m.d_z) == (96, 384, 96)
    m = C.ModelConfig(preset="small", d_z=7)
    assert m.d_z == 7 and m.base_filters == 32


def test_config_hash_is_stable_and_sensitive():
    a, b = C.EventsConfig(), C.EventsConfig(percentile=95)
    assert C.config_hash(a) == C.config_hash(C.EventsConfig()) != C.config_hash(b)


def test_code_fingerprint_follows_imports():
    from precip_cvae.provenance import code_fingerprint, module_closure

    events = module_closure("precip_cvae.events")
    assert "precip_cvae.io" in events and "precip_cvae.config" in events
    assert "precip_cvae.preprocess" not in events  # editing preprocess.py must not rerun detect_events
    assert "precip_cvae.units" in module_closure("precip_cvae.preprocess")
    assert len(code_fingerprint("precip_cvae.events")) == 16


def test_code_digest_ignores_docstrings_comments_and_formatting(tmp_path):
    from precip_cvae.provenance import code_digest

    variants = {
        "base": 'def f(x):\n    return x + 1\n',
        "docstring": '"""Module doc."""\n\ndef f(x):\n    """Add one (mm/day)."""\n    return x + 1\n',
        "comment": '# a comment\ndef f(x):  # why\n    return x + 1  # plus one\n',
        "format": '\n\ndef f(\n    x,\n):\n    return (x\n            + 1)\n',
        "behaviour": 'def f(x):\n    return x + 2\n',
        "string": 'def f(x):\n    y = "a string that is not a docstring"\n    return x + 1\n',
    }
    digest = {}
    for name, text in variants.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        digest[name] = code_digest(path)
    assert digest["docstring"] == digest["comment"] == digest["format"] == digest["base"]
    assert digest["behaviour"] != digest["base"] and digest["string"] != digest["base"]
    # a function whose only statement is its docstring still parses to code (``pass``)
    (tmp_path / "only.py").write_text('def g():\n    """Nothing."""\n')
    (tmp_path / "pass.py").write_text('def g():\n    pass\n')
    assert code_digest(tmp_path / "only.py") == code_digest(tmp_path / "pass.py")


def test_a_docstring_edit_of_a_package_module_keeps_every_stage_fingerprint(tmp_path, monkeypatch):
    """The package copied, one docstring and one comment edited in io.py (imported by every stage): every
    fingerprint is unchanged; a changed constant changes those of the stages that import it."""
    import shutil

    from precip_cvae import provenance

    from pathlib import Path

    src = provenance._package_dir()
    scripts = sorted((Path(__file__).resolve().parents[1] / "workflow" / "scripts").glob("*.py"))
    stages = [p.stem for p in scripts]
    assert len(stages) == 11

    def fingerprints(pkg):
        monkeypatch.setattr(provenance, "_package_dir", lambda: pkg)
        provenance.clear_caches()
        out = {p.stem: provenance.script_fingerprint(p) for p in scripts}
        provenance.clear_caches()
        return out

    copy = tmp_path / "precip_cvae"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = fingerprints(copy)
    io_py = copy / "io.py"
    text = io_py.read_text()
    io_py.write_text(text.replace('"""', '"""Edited. ', 1).replace("\nimport json\n", "\nimport json  # edited\n", 1))
    assert io_py.read_text() != text
    assert fingerprints(copy) == before
    io_py.write_text(text.replace("def write_csv(", "EXTRA = 1\n\n\ndef write_csv(", 1))
    after = fingerprints(copy)
    assert {s for s in stages if after[s] != before[s]} == set(stages)  # every rule's script imports io


def test_the_evaluate_rules_depend_only_on_what_they_run(tmp_path, monkeypatch):
    """sample_ensembles, evaluate and compare_experiments each fingerprint only the evaluate modules their
    script imports: a change in the report reruns evaluate alone, one in the sampling sample_ensembles alone,
    one in the shared names all three."""
    import shutil
    from pathlib import Path

    from precip_cvae import provenance

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    rules = ["sample_ensembles", "evaluate", "compare_experiments", "downstream"]
    sampling = set(provenance.script_modules(scripts / "sample_ensembles.py"))
    assert "precip_cvae.evaluate.sample" in sampling
    assert not sampling & {"precip_cvae.evaluate.report", "precip_cvae.evaluate.score", "precip_cvae.evaluate.compare",
                           "precip_cvae.plots", "precip_cvae.metrics"}
    assert "precip_cvae.evaluate.report" not in provenance.script_modules(scripts / "compare_experiments.py")

    def fingerprints(pkg):
        monkeypatch.setattr(provenance, "_package_dir", lambda: pkg)
        provenance.clear_caches()
        out = {r: provenance.script_fingerprint(scripts / f"{r}.py") for r in rules}
        provenance.clear_caches()
        return out

    copy = tmp_path / "precip_cvae"
    shutil.copytree(provenance._package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = fingerprints(copy)

    def changed(module, old, new):
        path = copy / "evaluate" / module
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
        after = fingerprints(copy)
        path.write_text(text)
        return {r for r in rules if after[r] != before[r]}

    assert changed("report.py", "OVERFORECAST_BIAS = 1.5", "OVERFORECAST_BIAS = 2.0") == {"evaluate"}
    assert changed("report.py", '"""Rule ``evaluate``', '"""Edited. Rule ``evaluate``') == set()
    assert changed("sample.py", "return int(cfg.seed) * 1_000_003", "return int(cfg.seed) * 1_000_033") == {
        "sample_ensembles"}
    assert changed("compare.py", 'kind="stable"', 'kind="mergesort"') == {"compare_experiments"}
    assert changed("names.py", 'CVAE = "cvae"', 'CVAE = "cvae2"') == set(rules)


def test_experiment_seeds_expand_every_setting():
    cfg = {"train": {"seed": 9, "lr": 1e-3, "loss": {"lambda_ext": 5.0, "beta_kl": 0.01}},
           "model": {"preset": "small"},
           "experiments": {"default": {}, "ext0": {"train": {"loss": {"lambda_ext": 0.0}}}},
           "experiment_seeds": [0, 3]}
    assert C.experiment_names(cfg) == ["default_seed0", "default_seed3", "ext0_seed0", "ext0_seed3"]
    assert C.experiment_setting(cfg, "ext0_seed3") == ("ext0", 3)
    model, train = C.experiment_sections(cfg, "ext0_seed3")
    assert train == {"seed": 3, "lr": 1e-3, "loss": {"lambda_ext": 0.0, "beta_kl": 0.01}} and model == {"preset": "small"}
    assert cfg["train"]["seed"] == 9  # the run's section is not modified
    with pytest.raises(C.ConfigError, match="unknown experiment 'ext0_seed1'"):
        C.experiment_sections(cfg, "ext0_seed1")
    with pytest.raises(C.ConfigError, match="distinct non-negative"):
        C.experiment_names({**cfg, "experiment_seeds": [1, 1]})
    # without seeds: the names as written, the run's train.seed
    plain = {**cfg, "experiment_seeds": []}
    assert C.experiment_names(plain) == ["default", "ext0"] and C.experiment_setting(plain, "ext0") == ("ext0", None)
    assert C.experiment_sections(plain, "ext0")[1]["seed"] == 9


def test_generated_experiments_select_by_name_or_setting():
    cfg = {"experiments": {"default": {}, "ext0": {}}, "experiment_seeds": [0, 1]}
    assert C.generated_experiments(cfg) == ["default_seed0", "default_seed1", "ext0_seed0", "ext0_seed1"]
    pick = {**cfg, "generate": {"experiments": ["ext0", "default_seed1"]}}
    assert C.generated_experiments(pick) == ["default_seed1", "ext0_seed0", "ext0_seed1"]
    with pytest.raises(C.ConfigError, match="generate.experiments: unknown experiment 'ext9'"):
        C.generated_experiments({**cfg, "generate": {"experiments": ["ext9"]}})


SEED_NUMBERS = {"epochs": 100, "lr": 1e-4, "patience": 25, "early_stopping_metric": "MAE_all"}
SEED_LOSS = {"lambda_base": 1.0, "lambda_ext": 5.0, "beta_kl": 0.01, "lambda_mass": 0.01, "warmup_epochs": 15,
             "lambda_crps": 0.0, "lambda_tail": 0.0, "kl_per_pixel": False, "free_bits": 0.0}


def test_seed_preset_resolves_to_exactly_the_seeds_numbers():
    # as the workflow builds it: the schema's defaults (null for preset keys), then train.preset: seed
    section = _defaults(_section("train"))
    section["loss"] = _defaults(_section("train", "loss"))
    section["preset"] = "seed"
    cfg = C.TrainConfig.from_dict(section)
    assert {k: getattr(cfg, k) for k in SEED_NUMBERS} == SEED_NUMBERS
    assert {k: getattr(cfg.loss, k) for k in SEED_LOSS} == SEED_LOSS
    assert cfg.loss.n_prior == 0  # the seed decodes no prior ensemble in training
    # a key written out wins over the preset; the default preset is the measured one
    assert C.TrainConfig.from_dict({"preset": "seed", "loss": {"lambda_ext": 0.25}}).loss.lambda_ext == 0.25
    default = C.TrainConfig.from_dict({})
    assert default.loss.lambda_crps > 0 and default.loss.lambda_ext == 0 and default.loss.kl_per_pixel
    assert default.early_stopping_metric == "CRPS"
    with pytest.raises(C.ConfigError, match=r"unknown train preset 'paper'; valid names are \['default', 'seed'\]"):
        C.TrainConfig.from_dict({"preset": "paper"})
    with pytest.raises(C.ConfigError, match="set train.preset instead"):
        C.TrainConfig.from_dict({"loss": {"preset": "seed"}})
    with pytest.raises(C.ConfigError, match="resolved with preset 'default' but train.preset is 'seed'"):
        C.TrainConfig(preset="seed", loss=C.LossConfig())


def test_every_rule_is_fingerprinted_by_its_own_script():
    """Each rule's code param is the fingerprint of the script it runs, and that covers the script's whole
    import closure (downstream's script imports plots: a figure change reruns it)."""
    import re
    from pathlib import Path

    from precip_cvae.provenance import module_closure, script_modules

    repo = Path(__file__).resolve().parents[1]
    rules = 0
    for smk in sorted((repo / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]:
            script = re.search(r'script:\s*\n\s*"\.\./workflow/scripts/(\w+)\.py"', block)
            if script is None:
                continue
            code = re.search(r'code=script_code\("(\w+)"\)', block)
            assert code is not None and code.group(1) == script.group(1), (smk.name, block.split(":")[0])
            rules += 1
    assert rules == 10
    downstream = script_modules(repo / "workflow" / "scripts" / "downstream.py")
    assert "precip_cvae.plots" in downstream and set(module_closure("precip_cvae.downstream")) < set(downstream)
    # every package module the script names is in its closure
    for script in (repo / "workflow" / "scripts").glob("*.py"):
        named = set(re.findall(r"from (precip_cvae(?:\.\w+)?) import", script.read_text()))
        named |= {f"precip_cvae.{m.strip()}" for line in re.findall(r"from precip_cvae import ([\w, ]+)",
                                                                      script.read_text()) for m in line.split(",")}
        assert named - {"precip_cvae"} <= set(script_modules(script)), script.name
