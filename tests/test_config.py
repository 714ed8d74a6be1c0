"""Flags from dataclasses: presets, suffixes, typed values, errors, --help, checkpoint round trip."""
import dataclasses
from dataclasses import dataclass, field

import pytest

import bench
import train_downstream
from config import config_from_dict, config_leaves, field_comments, parse_config
from train_pretrain import PRESETS, TrainConfig


@dataclass
class Inner:
    ratios: tuple[float, ...] = ()   # a typed tuple whose default is empty
    flag: bool = False


@dataclass
class Outer:
    preset: str = "a"
    names: tuple[str, ...] = ("x",)
    steps: int = 3                   # how many steps
                                     # (a continued comment)
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("argv, msg", [
    (["--no_such_flag", "1"], "--no_such_flag is unknown"),
    (["--batch_size", "many"], "--batch_size"),
    (["--merge", "yes"], "true or false"),
    (["--keep_ratios", "0.9,0.95,0.4"], "must not increase"),
    (["--prune_layers", "2,4,12"], "depth 12"),
    (["--lam", "2"], "lam"),
    (["--method", "magic"], "not one of"),
    (["--preset", "huge"], "preset"),
    (["--prune.preset", "tome"], "prune.preset 'tome' is not one of elip, evit_paper"),
    (["--lr"], "needs a value"),
    (["lr", "1"], "unexpected argument"),
])
def test_bad_flags_are_refused(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        parse_config(TrainConfig(), argv, {"tiny": {}})


def test_flags_presets_and_suffixes():
    presets = {"tiny": {}, "big": {"vision_width": 256, "text_width": 256, "lr": 1e-4}}
    cfg, given = parse_config(TrainConfig(), ["--preset", "big", "--lr=2e-4", "--prune.lam", "0.6",
                                              "--keep_ratios", "0.8,0.5,0.3", "--distill", "false"],
                              presets)
    assert cfg.model.vision_width == 256 and cfg.run.lr == 2e-4 and cfg.model.prune.lam == 0.6
    assert cfg.model.prune.keep_ratios == (0.8, 0.5, 0.3) and cfg.model.distill is False
    assert given == {"preset": "big", "run.lr": 2e-4, "model.prune.lam": 0.6,
                     "model.prune.keep_ratios": (0.8, 0.5, 0.3), "model.distill": False}


def test_nested_prune_preset_after_the_top_level_one_before_the_flags(capsys):
    presets = {"tiny": {"tome_r": 3, "lam": 0.5}}
    cfg, given = parse_config(TrainConfig(), ["--prune.preset", "tome_paper"], presets)
    assert cfg.model.prune.method == "tome" and cfg.model.prune.tome_r == 13    # over tiny's 3
    assert cfg.model.prune.lam == 0.5 and cfg.model.prune.preset == "tome_paper"
    assert given == {"model.prune.preset": "tome_paper"}
    cfg, _ = parse_config(TrainConfig(), ["--preset", "tiny", "--tome_r", "5",
                                          "--model.prune.preset", "evit_paper"], presets)
    assert cfg.model.prune.tome_r == 5 and cfg.model.prune.method == "evit"     # flag wins
    assert cfg.model.prune.prune_layers == (3, 6, 9) and cfg.preset == "tiny"
    # a top-level preset may name the nested one; a full dotted name means itself
    cfg, _ = parse_config(TrainConfig(), ["--preset", "p"], {"p": {"prune.preset": "evit_paper"}})
    assert cfg.model.prune.keep_ratios == (0.7, 0.49, 0.343)
    with pytest.raises(SystemExit):
        parse_config(TrainConfig(), ["--preset", "albef", "--prune.preset", "tome_paper",
                                     "--help"], PRESETS)
    out = capsys.readouterr().out
    assert "--model.prune.preset: one of elip, evit_paper, tome_paper" in out
    assert "--model.prune.method (str, default 'tome')" in out
    assert "--model.prune.preset (str, default 'tome_paper')" in out


def test_values_parse_by_the_declared_type_even_from_an_empty_default():
    cfg, _ = parse_config(Outer(), ["--ratios", "0.5,0.25", "--names", "p,q", "--flag", "true"],
                          {"a": {}})
    assert cfg.inner.ratios == (0.5, 0.25) and isinstance(cfg.inner.ratios[0], float)
    assert cfg.names == ("p", "q") and cfg.inner.flag is True
    with pytest.raises(SystemExit, match="--ratios"):
        parse_config(Outer(), ["--ratios", "a,b"], {"a": {}})


def test_help_shows_type_default_comment_and_preset_values(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Outer(), ["--help"], {"a": {}}, doc="Outer's doc.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Outer's doc.")
    assert "--steps (int, default 3)\n      how many steps (a continued comment)" in out
    assert "--inner.ratios (float,..., default '')" in out
    # with a preset, --help shows the values that preset sets
    with pytest.raises(SystemExit):
        parse_config(TrainConfig(), ["--preset", "albef", "--help"], PRESETS)
    assert "--model.img_size (int, default 256)" in capsys.readouterr().out


def test_config_round_trips_through_a_checkpoint_dict():
    cfg, _ = parse_config(TrainConfig(), ["--preset", "albef", "--lam", "0.6"], PRESETS)
    back = config_from_dict(TrainConfig, dataclasses.asdict(cfg))
    assert back == cfg


@dataclass
class Task:
    task: str = "a"
    preset: str = "world"
    lr: float = 1.0
    k: int = 0


def test_presets_keyed_by_two_fields():
    presets = {("a", "world"): {"lr": 2.0}, ("a", "big"): {"lr": 3.0, "k": 5},
               ("b", "world"): {"k": 1}}
    cfg, given = parse_config(Task(), ["--task", "a", "--preset", "big", "--k", "7"], presets,
                              key=("task", "preset"))
    assert (cfg.lr, cfg.k) == (3.0, 7) and given == {"task": "a", "preset": "big", "k": 7}
    cfg, _ = parse_config(Task(), ["--task", "b"], presets, key=("task", "preset"))
    assert (cfg.task, cfg.preset, cfg.lr, cfg.k) == ("b", "world", 1.0, 1)
    with pytest.raises(SystemExit, match="--task 'c' is not one of a, b"):
        parse_config(Task(), ["--task", "c"], presets, key=("task", "preset"))
    with pytest.raises(SystemExit, match="--preset 'big' is not one of world with --task 'b'"):
        parse_config(Task(), ["--task", "b", "--preset", "big"], presets, key=("task", "preset"))


def undescribed_flags(cfg) -> list:
    """The flags of cfg (nested configs included) with no comment beside their field."""
    return [name for name, (owner, attr) in config_leaves(cfg).items()
            if not field_comments(type(owner)).get(attr)]


def test_every_flag_of_every_entry_point_says_what_it_does():
    for cfg in (TrainConfig(), train_downstream.DownstreamConfig(), bench.BenchConfig()):
        assert undescribed_flags(cfg) == [], type(cfg).__name__
