"""lwz.config: defaults, TOML round trip, CLI overrides by type, one-line errors."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from lwz.config import (
    Config, ConfigError, die_on_config_error, load_config, parse_args, save_config, to_toml, validate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the defaults enable the quality reward, which needs a reward-model folder
RM = "--rewards.quality_path=models/rm"


def _load(overrides=(), path=None) -> Config:
    return load_config(path, [RM, *overrides])


def _with_rm() -> Config:
    cfg = Config()
    cfg.rewards.quality_path = "models/rm"
    return cfg


def _write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(p)


def _err(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as ei:
        _load(overrides or [], path)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_default_is_paper_like():
    cfg = validate(_with_rm())
    assert cfg.rollout.max_new_tokens == 14000
    assert cfg.rollout.temperature == 0.8 and cfg.rollout.top_p == 1.0
    assert cfg.grpo.clip_low == 0.2 and cfg.grpo.kl_coef == 0.0
    assert cfg.rollout.stop_strings == ["</answer>"]
    assert cfg.tokenizer.path == "assets/tokenizer"
    assert cfg.norm_const == 14000.0
    assert _load() == _with_rm()


def test_quality_reward_needs_a_model_folder():
    msg = _err([RM.split("=")[0] + "=none"])
    assert msg == "rewards.quality = true needs rewards.quality_path (a reward-model folder)"
    assert load_config(None, ["--rewards.quality=false"]).rewards.quality_path is None


def test_optional_fields_default_to_none():
    # TOML has no null: save_config omits None, so an Optional field must default to None
    def walk(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v)
            elif "Optional" in str(f.type):
                assert v is None, f.name
    walk(Config())


def test_round_trip_defaults_and_edited(tmp_path):
    p = str(tmp_path / "a.toml")
    save_config(_with_rm(), p)
    assert load_config(p, []) == _with_rm()
    cfg = _load([
        "--name=run-ü", "--rollout.stop_strings=[\"</answer>\", \"a\\\"b\\\\c\\nd\"]",
        "--grpo.clip_c=3.0", "--distributed.accumulate_unsharded=true", "--data.template_en=Q: {question}\tA:",
        "--optim.betas=0.8,0.95", "--rewards.quality_ranks=1,3", "--optim.lr=3.5e-7",
        "--rewards.quality_path=/x/y z",
    ])
    p2 = str(tmp_path / "b.toml")
    save_config(cfg, p2)
    back = load_config(p2, [])
    assert back == cfg
    assert back.rollout.stop_strings == ["</answer>", 'a"b\\c\nd']
    assert back.optim.betas == (0.8, 0.95)
    assert back.distributed.accumulate_unsharded is True
    assert to_toml(back) == to_toml(cfg)


def test_toml_file_and_overrides(tmp_path):
    p = _write(tmp_path, """
        seed = 7
        steps = 3
        [rollout]
        group_size = 4
        max_new_tokens = 64
        [grpo]
        max_tokens_per_microbatch = 4096
        [rewards]
        weights = [1, 0.5, 2]
        default_length_range = [20, 40]
    """)
    cfg = _load(["--rollout.max_new_tokens=128", "--seed", "9"], p)
    assert cfg.seed == 9 and cfg.steps == 3
    assert cfg.rollout.group_size == 4 and cfg.rollout.max_new_tokens == 128
    assert cfg.rewards.weights == [1.0, 0.5, 2.0]
    assert cfg.rewards.default_length_range == [20, 40]


@pytest.mark.parametrize("arg,key,expected", [
    ("--rollout.max_new_tokens=1000", "rollout.max_new_tokens", 1000),
    ("--rollout.max_new_tokens=1e3", "rollout.max_new_tokens", 1000),
    ("--rollout.temperature=0.7", "rollout.temperature", 0.7),
    ("--rollout.temperature=1", "rollout.temperature", 1.0),
    ("--data.shuffle=false", "data.shuffle", False),
    ("--data.shuffle=0", "data.shuffle", False),
    ("--data.shuffle=True", "data.shuffle", True),
    ("--data.shuffle=1", "data.shuffle", True),
    ("--name=abc", "name", "abc"),
    ("--name='quoted'", "name", "quoted"),
    ("--grpo.clip_c=2.5", "grpo.clip_c", 2.5),
    ("--grpo.clip_c=none", "grpo.clip_c", None),
    ("--distributed.accumulate_unsharded=true", "distributed.accumulate_unsharded", True),
    ("--rollout.stop_strings=[\"</answer>\", \"<|user|>\"]", "rollout.stop_strings", ["</answer>", "<|user|>"]),
    ("--rollout.stop_strings=</answer>,<|user|>", "rollout.stop_strings", ["</answer>", "<|user|>"]),
    ("--rollout.stop_strings=[]", "rollout.stop_strings", []),
    ("--rewards.weights=[1, 2, 3]", "rewards.weights", [1.0, 2.0, 3.0]),
    ("--rewards.weights=1,0,0.5", "rewards.weights", [1.0, 0.0, 0.5]),
    ("--rewards.quality_ranks=", "rewards.quality_ranks", []),
    ("--optim.betas=[0.9,0.95]", "optim.betas", (0.9, 0.95)),
    ("--grpo.loss_agg=seq-mean-token-sum-norm", "grpo.loss_agg", "seq-mean-token-sum-norm"),
    ("--model.init=random", "model.init", "random"),
    ("--model.init= 'random' ", "model.init", "random"),
    ("--rollout.stop_strings=[</answer>,]", "rollout.stop_strings", ["</answer>"]),
    ("--rollout.max_new_tokens=0x40", "rollout.max_new_tokens", 64),
])
def test_override_types(arg, key, expected):
    cfg = _load([arg])
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == expected and type(obj) is type(expected)


def test_override_space_form_and_negative_and_bare_bool():
    cfg = _load(["--rollout.group_size", "8", "--grpo.entropy_coef", "-0.01", "--logging.plot"])
    assert cfg.rollout.group_size == 8
    assert cfg.grpo.entropy_coef == -0.01
    assert cfg.logging.plot is True
    assert _load(["--rollout.max-new-tokens=99"]).rollout.max_new_tokens == 99


def test_parse_args_config_and_resume(tmp_path):
    p = _write(tmp_path, "steps = 5\n[rewards]\nquality_path = 'rm'\n")
    cfg = parse_args(["--config", p, "--resume", "auto", "--optim.lr=2e-6"])
    assert cfg.steps == 5 and cfg.checkpoint.resume == "auto" and cfg.optim.lr == 2e-6
    cfg = parse_args([f"--config={p}", "--resume=runs/x/step_3"])
    assert cfg.checkpoint.resume == "runs/x/step_3"
    assert parse_args(["-c", p]).steps == 5
    assert parse_args([RM]) == _with_rm()


def test_unknown_keys_suggest():
    msg = _err(["--rollout.max_new_token=5"])
    assert msg == "unknown key 'rollout.max_new_token' (did you mean 'rollout.max_new_tokens'?)"
    assert "did you mean 'rollout.max_new_tokens'" in _err(["--max_new_tokens=5"])
    msg = _err(["--rollot.group_size=4"])
    assert "unknown section 'rollot'" in msg and "'rollout'" in msg
    assert "unknown key 'zzz'" in _err(["--zzz=1"])


def test_unknown_in_toml_names_file(tmp_path):
    p = _write(tmp_path, "[rollout]\nmax_new_token = 3\n")
    msg = _err(path=p)
    assert p in msg and "unknown key 'rollout.max_new_token'" in msg and "rollout.max_new_tokens" in msg
    p = _write(tmp_path, "[grpoo]\nclip_low = 0.1\n", "d.toml")
    msg = _err(path=p)
    assert "unknown section 'grpoo'" in msg and "'grpo'" in msg


@pytest.mark.parametrize("arg,expect", [
    ("--rollout.group_size=abc", "rollout.group_size = 'abc': expected int"),
    ("--rollout.group_size=2.5", "rollout.group_size = '2.5': expected int"),
    ("--rollout.temperature=hot", "rollout.temperature = 'hot': expected float"),
    ("--data.shuffle=maybe", "data.shuffle = 'maybe': expected bool"),
    ("--optim.betas=0.9", "optim.betas = [0.9]: expected list of 2 float"),
    ("--rewards.weights=[1, x, 2]", "rewards.weights[1] = 'x': expected float"),
])
def test_wrong_type_cli(arg, expect):
    assert expect in _err([arg])


def test_wrong_type_toml(tmp_path):
    msg = _err(path=_write(tmp_path, "[rollout]\ngroup_size = \"8\"\n"))
    assert "rollout.group_size = '8': expected int" in msg
    msg = _err(path=_write(tmp_path, "[data]\nshuffle = 1\n", "e.toml"))
    assert "data.shuffle = 1: expected bool" in msg
    msg = _err(path=_write(tmp_path, "rollout = 3\n", "f.toml"))
    assert "rollout" in msg and "table" in msg
    msg = _err(path=_write(tmp_path, "steps = [1\n", "g.toml"))
    assert "invalid TOML" in msg
    assert "not found" in _err(path=str(tmp_path / "missing.toml"))
    assert _err(path=str(tmp_path)) == f"config file '{tmp_path}' cannot be read: Is a directory"


@pytest.mark.parametrize("arg,key,value,allowed", [
    ("--rollout.max_new_tokens=-5", "rollout.max_new_tokens", "-5", ">= 1"),
    ("--rollout.group_size=1", "rollout.group_size", "1", ">= 2"),
    ("--rollout.prompts_per_step=0", "rollout.prompts_per_step", "0", ">= 1"),
    ("--rollout.temperature=0", "rollout.temperature", "0.0", "> 0"),
    ("--rollout.temperature=-1", "rollout.temperature", "-1.0", "> 0"),
    ("--rollout.top_p=0", "rollout.top_p", "0.0", "(0, 1]"),
    ("--rollout.top_p=1.5", "rollout.top_p", "1.5", "(0, 1]"),
    ("--rollout.top_k=-1", "rollout.top_k", "-1", ">= 0"),
    ("--rollout.batch_size=-1", "rollout.batch_size", "-1", ">= 0"),
    ("--rollout.cache_mem_fraction=0", "rollout.cache_mem_fraction", "0.0", "(0, 1]"),
    ("--rollout.page_size=-8", "rollout.page_size", "-8", ">= 0"),
    ("--rollout.cache_mem_fraction=1.5", "rollout.cache_mem_fraction", "1.5", "(0, 1]"),
    ("--grpo.clip_low=1", "grpo.clip_low", "1.0", "[0, 1)"),
    ("--grpo.clip_low=-0.1", "grpo.clip_low", "-0.1", "[0, 1)"),
    ("--grpo.clip_high=-0.1", "grpo.clip_high", "-0.1", ">= 0"),
    ("--grpo.clip_c=1", "grpo.clip_c", "1.0", "> 1"),
    ("--grpo.kl_coef=-1", "grpo.kl_coef", "-1.0", ">= 0"),
    ("--grpo.norm_const=0", "grpo.norm_const", "0.0", "> 0"),
    ("--grpo.ppo_epochs=0", "grpo.ppo_epochs", "0", ">= 1"),
    ("--grpo.mini_batches=0", "grpo.mini_batches", "0", ">= 1"),
    ("--grpo.max_tokens_per_microbatch=0", "grpo.max_tokens_per_microbatch", "0", "> 0"),
    ("--grpo.max_tokens_per_microbatch=1000", "grpo.max_tokens_per_microbatch", "1000", "longest sequence"),
    ("--grpo.logprob_scratch_mib=0", "grpo.logprob_scratch_mib", "0", "> 0"),
    ("--rewards.default_length_range=[50,40]", "rewards.default_length_range", "[50, 40]", "lo <= hi"),
    ("--rewards.default_length_range=[-1,40]", "rewards.default_length_range", "[-1, 40]", "0 <= lo"),
    ("--rewards.length_max_words=500", "rewards.length_max_words", "500", "upper bound 800"),
    ("--rewards.weights=[1,1]", "rewards.weights", "[1.0, 1.0]", "3 numbers"),
    ("--rewards.quality_fsdp_min_gib=-2", "rewards.quality_fsdp_min_gib", "-2.0", ">= 0"),
    ("--rewards.weights=[1,-1,1]", "rewards.weights[1]", "-1.0", ">= 0"),
    ("--optim.grad_clip=0", "optim.grad_clip", "0.0", "> 0"),
    ("--optim.lr=-1e-6", "optim.lr", "-1e-06", ">= 0"),
    ("--optim.betas=0.9,1.0", "optim.betas[1]", "1.0", "[0, 1)"),
    ("--checkpoint.every=-1", "checkpoint.every", "-1", ">= 0"),
    ("--data.template_en=no placeholder", "data.template_en", "'no placeholder'", "{question}"),
    ("--steps=-1", "steps", "-1", ">= 1"),
    ("--steps=0", "steps", "0", ">= 1"),
    ("--data.max_prompt_tokens=0", "data.max_prompt_tokens", "0", ">= 1"),
    ("--grpo.mini_batches=129", "grpo.mini_batches", "129", "<= rollout.prompts_per_step * rollout.group_size"),
    ("--rollout.stop_strings=[\"x\", \"\"]", "rollout.stop_strings[1]", "''", "non-empty"),
    ("--rewards.quality_ranks=0,-1", "rewards.quality_ranks[1]", "-1", ">= 0"),
    ("--rewards.format_repetition_weight=-1", "rewards.format_repetition_weight", "-1.0", ">= 0"),
    ("--rewards.weights=[0,0,0]", "rewards.weights", "[0.0, 0.0, 0.0]", "enabled reward"),
    ("--optim.eps=0", "optim.eps", "0.0", "> 0"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay", "-0.1", ">= 0"),
    ("--optim.warmup_steps=-1", "optim.warmup_steps", "-1", ">= 0"),
    ("--optim.min_lr_ratio=1.5", "optim.min_lr_ratio", "1.5", "in [0, 1]"),
    ("--optim.eps=inf", "optim.eps", "inf", "a finite number"),
    ("--rollout.temperature=nan", "rollout.temperature", "nan", "a finite number"),
    ("--checkpoint.keep=-1", "checkpoint.keep", "-1", ">= 0"),
    ("--name=a/b", "name", "'a/b'", "without '/'"),
    ("--checkpoint.resume=", "checkpoint.resume", "''", "non-empty"),
])
def test_impossible_values(arg, key, value, allowed):
    msg = _err([arg])
    assert msg.startswith(f"{key} = {value} is not allowed"), msg
    assert allowed in msg, msg


@pytest.mark.parametrize("arg,key,choices", [
    ("--model.init=zeros", "model.init", "'pretrained', 'random'"),
    ("--model.dtype=fp8", "model.dtype", "'float32', 'bfloat16', 'float16'"),
    ("--model.attn_backend=xformers", "model.attn_backend", "'auto', 'flash', 'varlen', 'sdpa'"),
    ("--rollout.old_logprobs=none", "rollout.old_logprobs", "'recompute', 'rollout'"),
    ("--rollout.decode_kernel=paged", "rollout.decode_kernel", "'auto', 'flash', 'varlen', 'triton', 'sdpa'"),
    ("--grpo.kl_type=k4", "grpo.kl_type", "'k1', 'k2', 'k3'"),
    ("--grpo.loss_agg=sum", "grpo.loss_agg", "'token-mean'"),
    ("--grpo.pack_cost=flops", "grpo.pack_cost", "'tokens', 'quadratic'"),
    ("--rewards.length_on_broken_format=half", "rewards.length_on_broken_format", "'zero', 'whole_response'"),
    ("--rewards.quality_fsdp=yes", "rewards.quality_fsdp", "'auto', 'on', 'off'"),
    ("--optim.schedule=linear", "optim.schedule", "'cosine', 'constant'"),
    ("--distributed.backend=mpi", "distributed.backend", "'auto', 'nccl', 'gloo'"),
])
def test_unknown_enum_lists_allowed(arg, key, choices):
    msg = _err([arg])
    value = arg.split("=", 1)[1]
    assert msg.startswith(f"{key} = '{value}': expected one of"), msg
    assert choices in msg


def test_range_boundaries_are_allowed():
    # each bound that the ranges above reject one step beyond is itself allowed
    cfg = _load(["--rollout.group_size=2", "--rollout.top_p=1", "--grpo.clip_low=0", "--grpo.clip_high=0",
                 "--optim.min_lr_ratio=1", "--optim.lr=0", "--steps=1", "--grpo.mini_batches=8",
                 "--rewards.weights=[0,0,1]", "--rewards.length_max_words=801", "--rewards.quality_ranks=0"])
    assert cfg.rollout.group_size == 2 and cfg.grpo.clip_low == 0.0 and cfg.optim.min_lr_ratio == 1.0


def test_removed_key_is_an_unknown_key(tmp_path):
    # logging.log_every was never read; a TOML or command line that still sets it gets one line
    assert _err(["--logging.log_every=5"]).startswith("unknown key 'logging.log_every'")
    msg = _err(path=_write(tmp_path, "[logging]\nlog_every = 5\n"))
    assert "c.toml: unknown key 'logging.log_every'" in msg


def test_validate_retypes_a_config_edited_in_python():
    cfg = _with_rm()
    cfg.optim.betas = [0.8, 0.9]
    cfg.rollout.temperature = 1
    cfg.rollout.max_new_tokens = 64.0
    validate(cfg)
    assert cfg.optim.betas == (0.8, 0.9) and type(cfg.rollout.temperature) is float
    assert type(cfg.rollout.max_new_tokens) is int and cfg.rollout.max_new_tokens == 64
    cfg.rollout.group_size = "8"
    with pytest.raises(ConfigError, match=r"^rollout.group_size = '8': expected int$"):
        validate(cfg)
    cfg = _with_rm()
    cfg.grpo.loss_agg = "sum"
    with pytest.raises(ConfigError, match=r"^grpo.loss_agg = 'sum': expected one of 'token-mean'"):
        validate(cfg)


# rm_tiny.toml configures lwz/rewards/train_rm.py, which reads its own keys
SHIPPED = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".toml") and f != "rm_tiny.toml")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_round_trip(tmp_path, name):
    """Every shipped trainer config loads; its saved resolved config loads back equal, and each of
    its values set on the command line (as the TOML text tomli-w writes) gives the same value."""
    import tomli_w

    from lwz.config import CPTConfig
    root = CPTConfig if name.startswith("cpt-") else None  # lwz/pretrain.py's configs
    cfg = load_config(os.path.join(ROOT, "configs", name), [], root)
    p = str(tmp_path / "config.toml")
    save_config(cfg, p)
    assert load_config(p, [], root) == cfg
    args = []
    for section, table in dataclasses.asdict(cfg).items():
        items = table.items() if isinstance(table, dict) else [(None, table)]
        for k, v in items:
            if v is not None:
                text = tomli_w.dumps({"v": v}).split("=", 1)[1].strip()
                args.append(f"--{section}.{k}={text}" if k else f"--{section}={text}")
    assert len(args) > (35 if root else 60)
    assert load_config(None, args, root) == cfg


def test_bare_bool_flag_before_another_flag():
    cfg = _load(["--logging.plot=false", "--data.shuffle=false", "--logging.plot", "--data.shuffle", "--steps=3"])
    assert cfg.logging.plot is True and cfg.data.shuffle is True and cfg.steps == 3
    assert _err(["--steps", "--logging.plot"]) == "--steps: missing value (expected int)"


def test_all_rewards_off_rejected():
    msg = _err(["--rewards.length=false", "--rewards.quality=false", "--rewards.format=false"])
    assert "rewards" in msg and "enable at least one" in msg


def test_section_key_and_missing_value():
    assert "section" in _err(["--rollout=3"])
    assert "missing value" in _err(["--rollout.group_size"])


def test_norm_const_override():
    cfg = _load(["--grpo.norm_const=4096", "--grpo.loss_agg=seq-mean-token-sum-norm"])
    assert cfg.norm_const == 4096.0


def test_die_on_config_error_prints_one_line(capsys):
    with pytest.raises(SystemExit) as ei:
        with die_on_config_error():
            parse_args(["--rollout.max_new_token=5"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err == ("config error: unknown key 'rollout.max_new_token' "
                   "(did you mean 'rollout.max_new_tokens'?)\n")


def test_entry_point_exit_code_no_traceback():
    code = "from lwz.config import *\nwith die_on_config_error():\n    parse_args(['--grpo.clip_low=1'])\n"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "config error: grpo.clip_low = 1.0 is not allowed: must be in [0, 1)"]
