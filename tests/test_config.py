"""Tests for rlsys.config: defaults <- YAML <- key=value, and every bad input names its key or file."""
import dataclasses
import sys
import types
from pathlib import Path

import pytest
import yaml

from rlsys.config import (DEFAULT_CONFIG, AlgoConfig, Config, ConfigError, LearnerConfig, load_config,
                          validate)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def leaves(tree, prefix=""):
    """{'learner.lr': 0.001, ...} for every scalar in a parsed YAML mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get(cfg, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def config_error(path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------- what loads

def test_defaults_are_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    # the R1-Zero recipe values the docstring promises
    assert (cfg.algo.group_size, cfg.data.prompts_per_step, cfg.algo.beta, cfg.generator.temperature) == (16, 32, 0.001, 1.0)
    assert cfg.rollout_batch_size == 32 * 16
    validate(cfg)


@pytest.mark.parametrize("path", [REPO / "configs" / "tiny.yaml", REPO / "configs" / "toy.yaml", DEFAULT_CONFIG],
                         ids=["tiny", "toy", "default"])
def test_shipped_configs_load_and_override_only_what_they_list(path):
    listed = leaves(yaml.safe_load(path.read_text()))
    assert listed, f"{path} lists nothing"
    cfg = load_config(path)
    defaults = Config()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            dotted = f"{section.name}.{f.name}"
            expected = listed[dotted] if dotted in listed else get(defaults, dotted)
            assert get(cfg, dotted) == expected, dotted
    validate(cfg)


def test_default_yaml_is_the_smollm2_quickstart():
    assert DEFAULT_CONFIG == REPO / "rlsys" / "default.yaml"
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.data.name == "digit_add" and cfg.data.prefill == "<think>"


def test_yaml_overrides_only_what_it_lists(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.5\nalgo:\n  group_size: 4\n")
    cfg = load_config(path)
    assert cfg.learner == dataclasses.replace(LearnerConfig(), lr=0.5)
    assert cfg.algo == dataclasses.replace(AlgoConfig(), group_size=4)
    assert (cfg.model, cfg.data, cfg.generator, cfg.reward, cfg.cluster, cfg.trainer) == \
           (Config().model, Config().data, Config().generator, Config().reward, Config().cluster, Config().trainer)


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.5\n  epochs: 3\ntrainer:\n  seed: 7\n")
    cfg = load_config(path, ["learner.lr=0.25", "trainer.seed=9", "algo.epsilon_high=0.28", "cluster.address=auto"])
    assert cfg.learner.lr == 0.25           # file said 0.5
    assert cfg.learner.epochs == 3          # from the file, not overridden
    assert cfg.trainer.seed == 9            # file said 7
    assert cfg.algo.epsilon_high == 0.28    # default None
    assert cfg.cluster.address == "auto"
    assert isinstance(cfg.learner.lr, float) and isinstance(cfg.trainer.seed, int)


def test_overrides_without_file_and_later_override_wins():
    cfg = load_config(None, ["learner.lr=0.1", "learner.lr=0.2"])
    assert cfg.learner.lr == 0.2


# ---------------------------------------------------------------- bad keys and values

@pytest.mark.parametrize("overrides,key", [
    (["learner.lrr=1"], "learner.lrr"),
    (["lerner.lr=1"], "lerner"),
    (["foo=1"], "foo"),
    (["model.tiny_sed=3"], "model.tiny_sed"),
])
def test_unknown_key_in_overrides_names_it(overrides, key):
    assert key in config_error(None, overrides)


@pytest.mark.parametrize("text,key", [
    ("learner:\n  lrr: 1\n", "learner.lrr"),
    ("foo: 1\n", "foo"),
    ("algo:\n  group_size: 4\n  grup: 2\n", "algo.grup"),
])
def test_unknown_key_in_yaml_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    msg = config_error(path)
    assert key in msg and str(path) in msg


@pytest.mark.parametrize("override,key", [
    ("learner.lr=abc", "learner.lr"),
    ("learner.num_ranks=two", "learner.num_ranks"),
    ("algo.std_normalize=maybe", "algo.std_normalize"),
])
def test_wrong_type_in_override_names_key(override, key):
    assert key in config_error(None, [override])


def test_wrong_type_in_yaml_names_key_and_file(tmp_path):
    path = write(tmp_path, "learner:\n  lr: abc\n")
    msg = config_error(path)
    assert "learner.lr" in msg and str(path) in msg


def test_section_given_a_scalar_names_the_section(tmp_path):
    path = write(tmp_path, "learner: 3\n")
    msg = config_error(path)
    assert "'learner'" in msg and str(path) in msg
    assert "'learner'" in config_error(None, ["learner=3"])


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert str(path) in config_error(path)


def test_yaml_syntax_error_is_a_config_error_naming_the_file(tmp_path):
    path = write(tmp_path, "learner: [\n")
    assert str(path) in config_error(path)


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    assert str(path) in config_error(path)


@pytest.mark.parametrize("item", ["learner.lr", "learner"])
def test_override_without_equals_is_refused(item):
    msg = config_error(None, [item])
    assert repr(item) in msg and "key=value" in msg


# ---------------------------------------------------------------- cross-field checks

def test_mini_batch_must_divide_rollout_batch():
    # rollout batch 4 * 4 = 16; 12 does not divide it, and is a multiple of 1 * 4
    msg = config_error(None, ["data.prompts_per_step=4", "algo.group_size=4", "learner.num_ranks=1",
                              "learner.micro_batch_size=4", "learner.mini_batch_size=12"])
    assert msg.startswith("learner.mini_batch_size=12") and "must divide" in msg and "= 16" in msg


def test_mini_batch_must_be_multiple_of_ranks_times_micro():
    # 16 divides the rollout batch 32 * 16, but is not a multiple of 2 ranks * 16 = 32
    msg = config_error(None, ["learner.mini_batch_size=16", "learner.num_ranks=2", "learner.micro_batch_size=16"])
    assert msg.startswith("learner.mini_batch_size=16") and "multiple of" in msg
    assert "learner.num_ranks * learner.micro_batch_size = 32" in msg


def test_consistent_batch_sizes_pass():
    cfg = load_config(None, ["data.prompts_per_step=4", "algo.group_size=4", "learner.num_ranks=2",
                             "learner.micro_batch_size=2", "learner.mini_batch_size=8"])
    assert cfg.rollout_batch_size == 16


def test_group_size_one_is_refused():
    # rollout batch 32 * 1 = 32 and 32 % (2 * 4) == 0, so only the group size is wrong
    msg = config_error(None, ["algo.group_size=1", "learner.mini_batch_size=32", "learner.micro_batch_size=4"])
    assert msg.startswith("algo.group_size") and "got 1" in msg


@pytest.mark.parametrize("override,key", [
    ("model.dtype=fp16", "model.dtype"),
    ("data.template=alpaca", "data.template"),
    ("algo.aggregation=sample", "algo.aggregation"),
    ("cluster.backend=mpi", "cluster.backend"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("algo.beta=-0.1", "algo.beta"),
    ("reward.timeout_s=0", "reward.timeout_s"),
    ("generator.num_engines=0", "generator.num_engines"),
    # configs the learner cannot reproduce, refused with the reason
    ("generator.temperature=0", "generator.temperature"),
    ("generator.top_p=0.9", "generator.top_p"),
    ("algo.dual_clip=1.0", "algo.dual_clip"),
    ("learner.lr_schedule=linear", "learner.lr_schedule"),
    ("learner.warmup_steps=-1", "learner.warmup_steps"),
    ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio"),
    # out of range: refused before any actor starts (learner.lr=-1 used to die in the optimizer)
    ("learner.lr=-1", "learner.lr"),
    ("learner.lr=0", "learner.lr"),
    ("learner.weight_decay=-0.1", "learner.weight_decay"),
    ("algo.epsilon=0", "algo.epsilon"),
    ("generator.num_cpus=0", "generator.num_cpus"),
    ("trainer.total_steps=0", "trainer.total_steps"),
    ("trainer.save_every=-2", "trainer.save_every"),
    ("reward.format_weight=-1", "reward.format_weight"),
    ("generator.gpu_memory_utilization=1.5", "generator.gpu_memory_utilization"),
    ("generator.max_tokens=4096", "generator.max_tokens"),
    ("trainer.in_flight=drop", "trainer.in_flight"),
    ("trainer.in_flight=requeue", "trainer.in_flight"),  # synchronous: nothing is ever in flight at a push
    ("algo.off_policy=clip", "algo.off_policy"),
    ("algo.off_policy_rows=fresh", "algo.off_policy_rows"),
    ("algo.is_low=0.5", "algo.is_low"),  # tis truncates at is_cap only
    ("algo.is_cap=0.9", "algo.is_low"),  # the band must hold a ratio of 1
])
def test_bad_values_name_their_key(override, key):
    msg = config_error(None, [override])
    assert msg.startswith(key), msg


@pytest.mark.parametrize("override", ["model.dtype=bfloat16", "data.template=chat", "data.template=none",
                                      "algo.aggregation=sequence", "cluster.backend=gloo", "cluster.backend=nccl"])
def test_good_enum_values_pass(override):
    key, value = override.split("=")
    assert get(load_config(None, [override, "learner.zero_stage=1"]), key) == value


def test_bf16_needs_zero_stage_one_or_more():
    # DeepSpeed accumulates ZeRO-0 bf16 gradients in bf16; ZeRO 1-3 accumulate them in fp32.
    msg = config_error(None, ["model.dtype=bfloat16", "learner.zero_stage=0"])
    assert msg.startswith("model.dtype=bfloat16 needs learner.zero_stage >= 1"), msg
    for stage in (1, 2, 3):
        assert load_config(None, ["model.dtype=bfloat16", f"learner.zero_stage={stage}"]).model.dtype == "bfloat16"


# ---------------------------------------------------------------- the CLI stops before anything starts

@pytest.fixture
def no_training(monkeypatch):
    """A stand-in rlsys.loops.train: the CLI reaching it fails the test instead of starting Ray."""
    fake = types.ModuleType("rlsys.loops.train")

    def train(cfg):
        raise AssertionError("the CLI started training despite a bad config")

    fake.train = train
    monkeypatch.setitem(sys.modules, "rlsys.loops.train", fake)


def test_cli_unknown_key_returns_2_and_names_it(capsys, no_training):
    from rlsys.cli import main

    assert main(["train", "learner.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "learner.lrr" in err


def test_cli_missing_file_returns_2_and_names_it(capsys, no_training, tmp_path):
    from rlsys.cli import main

    path = tmp_path / "missing.yaml"
    assert main(["train", str(path), "trainer.seed=1"]) == 2
    assert str(path) in capsys.readouterr().err


def test_cli_bad_value_in_file_returns_2(capsys, no_training, tmp_path):
    from rlsys.cli import main

    path = write(tmp_path, "model:\n  dtype: fp8\n")
    assert main(["train", str(path)]) == 2
    assert "model.dtype" in capsys.readouterr().err


def test_engines_on_gpus_of_their_own_take_most_of_the_memory():
    from rlsys.config import engine_memory_share

    assert engine_memory_share(load_config(None)) == 0.9
    assert engine_memory_share(load_config(None, ["cluster.placement=disaggregated"])) == 0.9
    assert engine_memory_share(load_config(None, ["cluster.placement=colocated"])) == 0.45
    assert engine_memory_share(load_config(None, ["generator.gpu_memory_utilization=0.3"])) == 0.3


# ---------------------------------------------------------------- secrets are never written

SECRETS = {"WANDB_API_KEY": "s3cr3t-wandb-0d9f", "MY_TOKEN": "s3cr3t-token-77aa",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-5c1e", "HF_HOME": "/data/hf-cache-3b2"}


def _env_vars_override(env: dict[str, str]) -> str:
    return "submit.env_vars={" + ", ".join(f"{k}: '{v}'" for k, v in env.items()) + "}"


def test_to_yaml_and_to_dict_hold_no_value_of_submit_env_vars():
    from rlsys.config import REDACTED, to_dict, to_yaml

    cfg = load_config(REPO / "configs" / "tiny.yaml", [_env_vars_override(SECRETS), "learner.lr=0.25"])
    assert cfg.submit.env_vars == SECRETS  # the config itself keeps them: the job's environment is built from it
    text, tree = to_yaml(cfg), to_dict(cfg)
    for value in SECRETS.values():  # HF_HOME too: every env var is the user's job environment
        assert value not in text and value not in repr(tree)
    assert tree["submit"]["env_vars"] == {key: REDACTED for key in SECRETS}  # which were set stays readable
    # Nothing else changes.
    plain = dataclasses.asdict(cfg)
    plain["submit"]["env_vars"] = tree["submit"]["env_vars"]
    assert tree == plain
    assert tree["learner"]["lr"] == 0.25 and tree["model"]["path"] == "tiny"


def test_redacted_yaml_loads_back_as_the_same_config_but_the_secrets(tmp_path):
    from rlsys.config import REDACTED, to_yaml

    cfg = load_config(REPO / "configs" / "tiny.yaml", [_env_vars_override(SECRETS)])
    back = load_config(write(tmp_path, to_yaml(cfg)))
    assert back.submit.env_vars == {key: REDACTED for key in SECRETS}
    assert dataclasses.replace(back, submit=cfg.submit) == cfg


@pytest.mark.parametrize("name,secret", [
    ("WANDB_API_KEY", True), ("hf_token", True), ("HF_TOKEN", True), ("my_api_key", True), ("Db_Secret", True),
    ("AWS_ACCESS_KEY_ID", True), ("aws_region", True), ("max_tokens", False), ("tokens", False),
    ("key", False), ("TOKENIZER", False), ("monkey", False), ("HF_HOME", False)])
def test_secret_key_patterns(name, secret):
    from rlsys.config import is_secret_key

    assert is_secret_key(name) is secret


def test_keys_matching_a_secret_pattern_are_redacted_at_any_depth():
    from rlsys.config import REDACTED, redacted

    plain = {"submit": {"env_vars": {}}, "a": {"hf_token": "x1", "b": [{"aws_secret": "x2"}], "max_tokens": 5},
             "db_secret": {"user": "x3", "port": 5}, "api_key": None}
    assert redacted(plain) == {"submit": {"env_vars": {}}, "a": {"hf_token": REDACTED, "b": [{"aws_secret": REDACTED}],
                                                                "max_tokens": 5},
                               "db_secret": {"user": REDACTED, "port": REDACTED}, "api_key": None}
    assert plain["a"]["hf_token"] == "x1"  # a copy: the caller's dict is untouched


def test_no_config_field_is_taken_for_a_secret():
    """A field whose name matched a pattern would be written as REDACTED and, unless a string, make
    the shipped config unloadable in the job: rename the field or narrow the pattern."""
    from rlsys.config import is_secret_key

    defaults = Config()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            assert not is_secret_key(f.name), f"{section.name}.{f.name}"


def test_redact_args_hides_secret_overrides_on_a_command_line():
    from rlsys.config import REDACTED, redact_args

    args = ["train", "configs/tiny.yaml", "submit.env_vars={MY_TOKEN: t0k, HF_HOME: /hf}", "submit.env_vars.X=v1",
            "+submit.env_vars.Y=v2", "learner.lr=0.5", "foo.hf_token=v3", "--config-env", "RLSYS_SUBMITTED_CONFIG"]
    assert redact_args(args) == ["train", "configs/tiny.yaml", f"submit.env_vars={REDACTED}",
                                 f"submit.env_vars.X={REDACTED}", f"submit.env_vars.Y={REDACTED}", "learner.lr=0.5",
                                 f"foo.hf_token={REDACTED}", "--config-env", "RLSYS_SUBMITTED_CONFIG"]


def test_config_doctests():
    import doctest

    from rlsys import config

    assert doctest.testmod(config).failed == 0


# ---------------------------------------------------------------- the declared checks

def test_declared_checks_name_real_keys_and_match_the_components_lists():
    from rlsys.config import CHOICES, LOWER_BOUNDS, RANGES, RULES, get_key
    from rlsys.math.language import SCRIPTS
    from rlsys.math.rewards import VERIFIERS
    from rlsys.sandbox.execute import MODES
    from rlsys.actors.tools import OUTPUT_FORMS, TOOLS

    cfg = Config()
    for key in [*CHOICES, *LOWER_BOUNDS, *RANGES, *(k for r in RULES for k in r.keys)]:
        get_key(cfg, key)  # AttributeError for a key that does not exist
    assert CHOICES["reward.verifier"] == ("auto", *VERIFIERS)
    assert CHOICES["reward.code.sandbox"] == MODES
    assert CHOICES["generator.tools"] == TOOLS
    assert CHOICES["generator.tool_output"] == OUTPUT_FORMS
    assert CHOICES["reward.language"] == tuple(sorted(SCRIPTS))
    assert all(r.says and r.check(cfg) is None for r in RULES), "the defaults break no rule"


@pytest.mark.parametrize("overrides,message", [
    (["generator.sleep_level=3"], "generator.sleep_level must be 0, 1, 2 or null, got 3"),
    (["algo.group_size=1"], "algo.group_size must be >= 2, got 1"),
    (["eval.top_p=0"], "eval.top_p must be in (0.0, 1.0], got 0.0"),
    (["learner.min_lr_ratio=1.5"], "learner.min_lr_ratio must be in [0.0, 1.0], got 1.5"),
    (["reward.code.memory_mb=8"], "reward.code.memory_mb must be >= 16, got 8"),
    (["generator.tools=[calculator,shell]"], "generator.tools: each item must be calculator or python, got 'shell'"),
    (["generator.tool_output=turn"], "generator.tool_output=turn needs data.template=chat (a tool turn is a chat "
                                     "message), got data.template=r1_zero"),
    (["reward.code.workers=3", "reward.code.max_workers=2"], "reward.code.max_workers=2 is below reward.code.workers=3"),
    (["autoscale.enabled=true", "autoscale.grow_above=1.5", "generator.num_engines=2"],
     "autoscale.grow_above must be in (0, 1) and autoscale.patience >= 1, got 1.5, 2"),
])
def test_each_kind_of_declared_check_stops_with_its_message(overrides, message):
    assert config_error(None, overrides) == message
