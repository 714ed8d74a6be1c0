"""
Command-line flags from dataclasses: every field of a (nested) config is a flag.

    cfg, given = parse_config(TrainConfig(), sys.argv[1:], PRESETS, doc=__doc__)

- `--name value` or `--name=value`, by the full dotted name (`--model.prune.lam 0.6`) or any
  unambiguous suffix (`--prune.lam 0.6`, `--lam 0.6`); a full name always means itself; an
  unknown or ambiguous flag is an error.
- A value parses by the field's declared type: `true`/`false` for bool, `2,4,10` for
  `tuple[int, ...]`, and so on.
- A preset (the field named by `key`, e.g. `--preset albef`) first sets a consistent group of
  fields; explicit flags override it. With a tuple of keys, e.g. ("task", "preset"), the presets
  are keyed by the tuple of those fields' values (`--task vqa --preset albef`).
- A nested config with its own `preset` field and a `presets()` table (`--prune.preset
  tome_paper`) is set by that preset after the top-level one and before the explicit flags.
- `--help` (or `-h`) prints every flag with its type, its default (after the preset, if one is
  given) and the comment written beside the field in the source.
The nested dataclasses are rebuilt at the end, so their `__post_init__` checks see the final
values and a bad setting is refused before any data or model is built.
"""
import dataclasses
import os
import difflib
import inspect
import re
import typing


def config_leaves(cfg, prefix: str = "") -> dict:
    """{dotted name: (owner dataclass instance, field name)} for every leaf field of cfg."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(config_leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cfg, f.name)
    return out


def nested_presets(cfg, prefix: str = "") -> dict:
    """{dotted name: nested config} of every nested dataclass with a `preset` field and a
    presets() table of its own."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if hasattr(value, "preset") and hasattr(value, "presets"):
                out[prefix + f.name] = value
            out.update(nested_presets(value, f"{prefix}{f.name}."))
    return out


def flag_matches(leaves: dict, name: str) -> list:
    """The leaves a flag may mean: itself if it is a full dotted name, else those it is a
    suffix of."""
    if name in leaves:
        return [name]
    return [k for k in leaves if k.endswith("." + name)]


def resolve_flag(leaves: dict, name: str) -> str:
    """The dotted name a flag means: itself, or the one leaf it is a suffix of."""
    matches = flag_matches(leaves, name)
    if len(matches) != 1:
        what = "ambiguous, could be " + ", ".join(matches) if matches else "unknown"
        names = sorted({part for k in leaves for part in (k, k.rsplit(".", 1)[-1])})
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean --{near[0]}?" if matches == [] and near else ""
        raise SystemExit(f"error: flag --{name} is {what}{hint} (see --help)")
    return matches[0]


def field_type(owner, name: str):
    return typing.get_type_hints(type(owner))[name]


def type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"{typing.get_args(tp)[0].__name__},..."
    return tp.__name__


def parse_value(tp, text: str, flag: str):
    """Parse a flag's text by the field's declared type."""
    if tp in (tuple, list):
        raise TypeError(f"the field behind --{flag} must declare its items: tuple[int, ...]")
    try:
        if tp is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return text.lower() == "true"
        if typing.get_origin(tp) is tuple:
            item = typing.get_args(tp)[0]
            return tuple(parse_value(item, v, flag) for v in text.split(",") if v != "")
        return tp(text)
    except ValueError as e:
        raise SystemExit(f"error: --{flag} {text!r}: {e}") from None


def field_comments(cls) -> dict:
    """{field name: the comment beside it in the class's source}. A comment line indented past
    the field continues its comment; one at the field's own indentation heads the next fields."""
    comments, last, indent = {}, None, 0
    for line in inspect.getsource(cls).splitlines():
        depth = len(line) - len(line.lstrip())
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$", line)
        if m and not line.strip().startswith("#"):
            last, indent = m.group(1), depth
            comments[last] = (m.group(2) or "").strip()
        elif last and line.strip().startswith("#") and depth > indent and comments[last]:
            comments[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return comments


def help_text(cfg, presets: dict, keys: tuple, doc: str) -> str:
    choices = ", ".join(" ".join(map(str, k)) if isinstance(k, tuple) else k for k in presets)
    lines = [doc.strip(), "", f"--{' --'.join(keys)}: one of {choices} (sets a group of flags "
                               f"below; explicit flags override it)"]
    for prefix, sub in nested_presets(cfg).items():
        lines.append(f"--{prefix}.preset: one of {', '.join(sub.presets())} (sets {prefix}.* "
                     f"flags after --{' --'.join(keys)}; explicit flags override it)")
    lines.append("")
    comments = {}
    for name, (owner, attr) in config_leaves(cfg).items():
        cls = type(owner)
        comments.setdefault(cls, field_comments(cls))
        default = getattr(owner, attr)
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        lines.append(f"  --{name} ({type_name(field_type(owner, attr))}, default {default!r})")
        if comments[cls].get(attr):
            lines.append(f"      {comments[cls][attr]}")
    return "\n".join(lines)


def split_argv(argv: list) -> list:
    """['--a', '1', '--b=2'] -> [('a', '1'), ('b', '2')]."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r} (flags look like --name value; "
                             f"see --help)")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            name, text, i = arg[2:], argv[i + 1], i + 1
        else:
            raise SystemExit(f"error: flag {arg} needs a value (see --help)")
        pairs.append((name, text))
        i += 1
    return pairs


def choose_preset(presets: dict, keys: tuple, values: tuple):
    """The key of `presets` that the values of the fields `keys` name; an error names the first
    value that no preset has (given the values before it) and the choices."""
    if len(keys) == 1:
        if values[0] not in presets:
            raise SystemExit(f"error: --{keys[0]} {values[0]!r} is not one of {', '.join(presets)}")
        return values[0]
    for n, (key, value) in enumerate(zip(keys, values)):
        choices = list(dict.fromkeys(k[n] for k in presets if k[:n] == values[:n]))
        if value not in choices:
            given = "".join(f" with --{k} {v!r}" for k, v in zip(keys[:n], values[:n]))
            raise SystemExit(f"error: --{key} {value!r} is not one of {', '.join(choices)}{given}")
    return values


def parse_config(cfg, argv: list, presets: dict, key: str | tuple = "preset", doc: str = ""):
    """Apply the preset named by the field `key` (or by the fields of a tuple of keys), then the
    flags, to cfg (see the module docstring). Returns (the new config, {dotted name: value} of
    the flags given explicitly)."""
    want_help = any(a in ("-h", "--help") for a in argv)
    pairs = split_argv([a for a in argv if a not in ("-h", "--help")])
    leaves = config_leaves(cfg)
    keys = (key,) if isinstance(key, str) else tuple(key)
    values = tuple(next((t for n, t in pairs if n == k), getattr(cfg, k)) for k in keys)
    preset = choose_preset(presets, keys, values)
    apply_preset(cfg, presets[preset])
    for prefix, sub in nested_presets(cfg).items():
        name = next((t for n, t in pairs if flag_matches(leaves, n) == [f"{prefix}.preset"]),
                    sub.preset)
        if name and name not in sub.presets():
            raise SystemExit(f"error: --{prefix}.preset {name!r} is not one of "
                             f"{', '.join(sub.presets())}")
        sub.preset = name
        for attr, value in sub.presets().get(name, {}).items():
            setattr(sub, attr, value)
    if want_help:
        print(help_text(cfg, presets, keys, doc))
        raise SystemExit(0)
    given = {}
    for name, text in pairs:
        dotted = resolve_flag(leaves, name)
        owner, attr = leaves[dotted]
        value = parse_value(field_type(owner, attr), text, name)
        setattr(owner, attr, value)
        given[dotted] = value
    return rebuild(cfg), given


def apply_preset(cfg, values: dict):
    """Set the fields named in `values` (flag names: dotted or unambiguous suffixes) in place."""
    leaves = config_leaves(cfg)
    for name, value in values.items():
        owner, attr = leaves[resolve_flag(leaves, name)]
        setattr(owner, attr, value)
    return cfg


def rebuild(cfg):
    """Re-create the nested dataclasses so that their __post_init__ checks see the final values."""
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kw = {k: rebuild(v) if dataclasses.is_dataclass(v) else v for k, v in kw.items()}
    try:
        return type(cfg)(**kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def config_from_dict(cls, d: dict):
    """The inverse of dataclasses.asdict, for configs stored in checkpoints (lists become
    tuples). A field the dict lacks keeps its default."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, tp = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            value = config_from_dict(tp, value)
        elif isinstance(value, list):
            value = tuple(value)
        kw[f.name] = value
    return cls(**kw)


def run_subcommand(commands: dict, argv: list, usage: str):
    """`python SCRIPT COMMAND [--flag value ...]`: call commands[COMMAND](flags); no command, or
    -h/--help alone, prints the usage (exit 2 without a command, 0 when asked)."""
    if argv in ([], ["-h"], ["--help"]):
        print(usage)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in commands:
        raise SystemExit(f"error: unknown command {argv[0]!r}\n{usage}")
    commands[argv[0]](argv[1:])


def check_paths(cfg, flags: tuple):
    """Every file or folder the top-level fields `flags` of cfg name (a path or a tuple of
    paths; empty: none) exists, before anything is built."""
    for flag in flags:
        value = getattr(cfg, flag)
        for path in (p for p in (value if isinstance(value, tuple) else (value,)) if p):
            if not os.path.exists(path):
                raise SystemExit(f"error: --{flag} {path} does not exist")
