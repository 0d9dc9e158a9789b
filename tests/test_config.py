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


def _write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(p)


def _err(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides or [])
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_default_is_valid_and_paper_like():
    cfg = validate(Config())
    assert cfg.rollout.max_new_tokens == 14000
    assert cfg.rollout.temperature == 0.8 and cfg.rollout.top_p == 1.0
    assert cfg.grpo.clip_low == 0.2 and cfg.grpo.kl_coef == 0.0
    assert cfg.rollout.stop_strings == ["</answer>"]
    assert cfg.tokenizer.path == "assets/tokenizer"
    assert cfg.norm_const == 14000.0
    assert load_config(None, []) == Config()


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
    save_config(Config(), p)
    assert load_config(p, []) == Config()
    cfg = load_config(None, [
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
    cfg = load_config(p, ["--rollout.max_new_tokens=128", "--seed", "9"])
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
])
def test_override_types(arg, key, expected):
    cfg = load_config(None, [arg])
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == expected and type(obj) is type(expected)


def test_override_space_form_and_negative_and_bare_bool():
    cfg = load_config(None, ["--rollout.group_size", "8", "--grpo.entropy_coef", "-0.01", "--logging.plot"])
    assert cfg.rollout.group_size == 8
    assert cfg.grpo.entropy_coef == -0.01
    assert cfg.logging.plot is True
    assert load_config(None, ["--rollout.max-new-tokens=99"]).rollout.max_new_tokens == 99


def test_parse_args_config_and_resume(tmp_path):
    p = _write(tmp_path, "steps = 5\n")
    cfg = parse_args(["--config", p, "--resume", "auto", "--optim.lr=2e-6"])
    assert cfg.steps == 5 and cfg.checkpoint.resume == "auto" and cfg.optim.lr == 2e-6
    cfg = parse_args([f"--config={p}", "--resume=runs/x/step_3"])
    assert cfg.checkpoint.resume == "runs/x/step_3"
    assert parse_args([]) == Config()


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
    ("--steps=-1", "steps", "-1", ">= 0"),
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


def test_all_rewards_off_rejected():
    msg = _err(["--rewards.length=false", "--rewards.quality=false", "--rewards.format=false"])
    assert "rewards" in msg and "enable at least one" in msg


def test_section_key_and_missing_value():
    assert "section" in _err(["--rollout=3"])
    assert "missing value" in _err(["--rollout.group_size"])


def test_norm_const_override():
    cfg = load_config(None, ["--grpo.norm_const=4096", "--grpo.loss_agg=seq-mean-token-sum-norm"])
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
