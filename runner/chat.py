"""A checkpoint's own chat template, rendered and tokenized the way `transformers` does it.

Function-Gemma (and any chat model) only answers well when its prompt is byte for byte
the one it was trained on, and that format lives in the checkpoint as a Jinja template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`), not in our code.
So the runner renders that template, in a sandbox (a template is code from whoever
published the checkpoint), with exactly what `transformers`' `apply_chat_template`
gives it, so the token ids are the ones the model saw in training:

- the environment of `transformers.utils.chat_template_utils._cached_compile_jinja_template`:
  jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks` and the
  `loopcontrols` extension; `tojson` without HTML escaping; the globals `raise_exception`,
  `strftime_now`, a restricted `dict` and a `namespace` that refuses underscore names;
- the variables of `apply_chat_template`: `messages`, `tools`, `documents` (None),
  `add_generation_prompt`, then every named special token of `tokenizer_config.json`
  (`bos_token`, `eos_token`, ... and model-specific `*_token` keys) unless a keyword
  argument overrides it;
- the same preparation of the inputs: keys whose value is None dropped from messages,
  everything rebuilt from plain JSON types, reasoning fields aliased;
- the same choice of template: `chat_template.jinja` over the config's entry; among
  several named templates `tool_use` when tools are given, else `default`;
- the rendered text encoded with `add_special_tokens=False` (the template writes <bos>).

(`apply_chat_template`'s optional `{% generation %}` tracking and control-token
sanitizing are not mirrored: the runner asks for neither; the tag is accepted and
renders its body, as transformers does when tracking is off.)

Everything that can go wrong with a template or the messages is a `ChatError`, one line
naming the file. Needs jinja2 (the runner extra), plus `tokenizers` to encode.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError
from .files import read_json
from .packages import missing
from .tokenizer import TokenizerError, check_unicode, load_tokenizer

MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes (transformers refuses them too)
MAX_TEMPLATE_BYTES = 1 << 20
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatError(UserError):
    """A chat template, tokenizer config or conversation that cannot be rendered."""


class PromptTooLong(ChatError):
    """A rendered conversation certainly longer than the tokens allowed (`Chat.encode`)."""


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise missing("jinja2", "it renders chat templates") from e
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise ChatError(f"jinja2 {jinja2.__version__} has known sandbox escapes; install jinja2>=3.1.6")
    return jinja2


def _environment():
    """The sandbox transformers renders chat templates in, with its globals and filters."""
    jinja2 = _jinja()
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training
        masks in transformers; rendering without tracking outputs the body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` and `dict.fromkeys(...)` without handing the template the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # rejects underscore names, which could reach CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def plain(value: Any) -> Any:
    """`value` rebuilt from JSON types only (transformers' `_plain_template_data`): the
    sandbox then never sees an object with methods of its own; anything else becomes a
    placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return plain(item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any, source: str) -> list[dict]:
    """What transformers does to a conversation before the template sees it."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError(f"{source}: a conversation is a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError(f"{source}: message {i} is a {type(message).__name__}, not an object")
        message = {k: v for k, v in message.items() if v is not None}  # `content: null` and the like
        message = plain(message)
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _prepare_tools(tools: Any, source: str) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatError(f"{source}: tools must be a list of JSON schemas")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatError(f"{source}: tool {i} is a {type(tool).__name__}, not a JSON schema object")
    return plain(list(tools))


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens(config: Mapping) -> dict[str, str]:
    """The template variables transformers takes from the tokenizer config: the named
    special tokens, `extra_special_tokens` given as a name -> token map, and any other
    `*_token` key holding a token (model-specific ones such as Gemma 3's `image_token`)."""
    tokens = {}
    for key, value in config.items():
        text = _token_text(value)
        if text is not None and (key in NAMED_SPECIAL_TOKENS or key.endswith("_token")):
            tokens[key] = text
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            text = _token_text(value)
            if text is not None:
                tokens[key] = text
    return tokens


class ChatTemplate:
    """One checkpoint's chat template(s) and special tokens. `render` gives the prompt text."""

    def __init__(self, templates: str | Mapping[str, str], tokens: Mapping[str, str] | None = None,
                 source: str = "chat template"):
        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        if not self.templates or not all(isinstance(t, str) for t in self.templates.values()):
            raise ChatError(f"{source}: no chat template text")
        self.tokens, self.source = dict(tokens or {}), source
        self._compiled: dict[str, Any] = {}
        self._env = None

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ChatTemplate":
        """The template(s) of a checkpoint or bundle directory, chosen as transformers does:
        `chat_template.jinja` (and `additional_chat_templates/*.jinja`) over `chat_template`
        in `tokenizer_config.json`, which may be a string or a list of {name, template}."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config: dict = {}
        if config_path.is_file():
            config = _read_json(config_path)
        templates: dict[str, str] = {}
        main = directory / "chat_template.jinja"
        source = config_path
        if main.is_file():
            templates["default"], source = _read_text(main), main
        extra_dir = directory / "additional_chat_templates"
        if extra_dir.is_dir():
            for path in sorted(extra_dir.glob("*.jinja")):
                templates[path.name.removesuffix(".jinja")] = _read_text(path)
        if not templates:
            entry = config.get("chat_template")
            if isinstance(entry, str):
                templates["default"] = entry
            elif isinstance(entry, list):
                for item in entry:
                    if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                            and isinstance(item.get("template"), str)):
                        raise ChatError(f"{config_path}: 'chat_template' entries must be "
                                        "{\"name\": ..., \"template\": ...}")
                    templates[item["name"]] = item["template"]
            elif entry is not None:
                raise ChatError(f"{config_path}: 'chat_template' must be a string or a list of named templates")
        if not templates:
            raise ChatError(f"{directory}: no chat template (neither chat_template.jinja nor 'chat_template' "
                            "in tokenizer_config.json)")
        return cls(templates, special_tokens(config), str(source))

    def pick(self, tools) -> str:
        """The name of the template transformers would use (`get_chat_template`)."""
        if len(self.templates) == 1 and "default" in self.templates:
            return "default"
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ChatError(f"{self.source}: several chat templates ({', '.join(sorted(self.templates))}) "
                        "and none named 'default'")

    def _template(self, name: str):
        if name not in self._compiled:
            jinja2 = _jinja()
            if self._env is None:
                self._env = _environment()
            try:
                self._compiled[name] = self._env.from_string(self.templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise ChatError(f"{self.source}: chat template{_label(name)} line {e.lineno}: {e.message}") from e
        return self._compiled[name]

    def render(self, messages, tools=None, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text, as `tokenizer.apply_chat_template(messages, tools=tools,
        add_generation_prompt=..., tokenize=False, **kwargs)` renders it."""
        jinja2 = _jinja()
        name = self.pick(tools)
        template = self._template(name)
        variables = {**self.tokens, **plain(kwargs)}  # keyword arguments override special tokens
        try:
            return template.render(messages=_prepare_messages(messages, self.source),
                                   tools=_prepare_tools(tools, self.source), documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except ChatError:
            raise
        except jinja2.TemplateError as e:  # raise_exception, undefined variables, sandbox refusals
            raise ChatError(f"{self.source}: chat template{_label(name)}: {_one_line(e)}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                OverflowError, RecursionError) as e:  # what a template does with messages it cannot handle
            raise ChatError(f"{self.source}: chat template{_label(name)} failed on these messages: "
                            f"{type(e).__name__}: {_one_line(e)}") from e


SHRINK = 4  # text characters per normalized character at the most (NFKC composes up to 3 into 1)


class Chat:
    """A template plus the tokenizer it belongs to: conversations to prompt token ids."""

    def __init__(self, template: ChatTemplate, tokenizer, missing: Mapping[str, str] | None = None):
        self.template, self.tokenizer = template, tokenizer
        self.missing = dict(missing or {})  # token -> what names it, absent from the tokenizer
        self._longest_piece: int | None = None

    @property
    def longest_piece(self) -> int:
        """The characters of the vocabulary's longest piece (found on first use: 262,144 pieces
        take about 50 ms)."""
        if self._longest_piece is None:
            self._longest_piece = max(1, max(map(len, self.tokenizer.get_vocab(with_added_tokens=True))))
        return self._longest_piece

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Chat":
        """The template and `tokenizer.json` of a directory, with the tokenizer as
        transformers builds it: tokens that `tokenizer_config.json` names as special
        (or lists in `added_tokens_decoder`) and that are in the vocabulary are matched
        whole in text, as added tokens are."""
        directory = Path(directory)
        template = ChatTemplate.from_dir(directory)
        tokenizer = load_tokenizer(directory / "tokenizer.json")
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        return cls(template, tokenizer, _align_added_tokens(tokenizer, config, config_path))

    def encode(self, messages, tools=None, add_generation_prompt: bool = True, most_tokens: int | None = None,
               **kwargs) -> list[int]:
        """The token ids of `apply_chat_template(..., tokenize=True)`: the rendered text,
        encoded without the tokenizer adding special tokens (the template wrote them).

        `most_tokens`: PromptTooLong, before any tokenizing, for a text so long that it must
        have more (each token spells at most the longest piece of the vocabulary, of the text
        normalized; SHRINK allows for a normalizer that composes characters). A server's
        13 MB conversation took 16 s to tokenize only to be refused."""
        text = self.template.render(messages, tools, add_generation_prompt, **kwargs)
        if most_tokens is not None and len(text) > SHRINK * self.longest_piece * most_tokens:
            raise PromptTooLong(f"the conversation is {len(text)} characters, more than {most_tokens} tokens "
                                f"(a token spells at most {self.longest_piece} of them)")
        for token, where in self.missing.items():
            if token in text:  # transformers would give it a new id past the vocabulary
                raise ChatError(f"{where} names {token!r} as a special token, the chat uses it, and "
                                "tokenizer.json does not have it: add it to tokenizer.json")
        check_unicode(text, "the chat")
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise TokenizerError(f"cannot tokenize the rendered chat ({_one_line(e)})") from e


def _align_added_tokens(tokenizer, config: Mapping, config_path: Path) -> dict[str, str]:
    """Make `tokenizer` match what transformers loads from the same files: each special
    token the config names, and each entry of `added_tokens_decoder`, that the vocabulary
    has but the tokenizer does not treat as an added token becomes one (same id). Returns
    those the vocabulary lacks (transformers appends them as new ids; a chat using one
    cannot be encoded the same way here)."""
    from tokenizers import AddedToken
    wanted: dict[str, tuple[bool, Mapping]] = {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        for entry in decoder.values():
            if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
                wanted[entry["content"]] = (bool(entry.get("special", False)), entry)
    for name, token in special_tokens(config).items():
        if token not in wanted or not wanted[token][0]:
            wanted[token] = (True, wanted.get(token, (True, {}))[1])
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if isinstance(extra, list):
        for item in extra:
            token = _token_text(item)
            if token is not None:
                wanted[token] = (True, item if isinstance(item, Mapping) else {})
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    missing = {}
    for token, (special, entry) in wanted.items():
        if tokenizer.token_to_id(token) is None:
            missing[token] = str(config_path)
        elif token not in added:
            flags = {k: bool(entry[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in entry}
            flags.setdefault("normalized", False)
            token_obj = AddedToken(token, special=special, **flags)
            (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token_obj])
    return missing


def _label(name: str) -> str:
    return "" if name == "default" else f" {name!r}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_BYTES:
            raise ChatError(f"{path}: {size} bytes, more than a chat template needs ({MAX_TEMPLATE_BYTES})")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChatError(f"{path}: not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise ChatError(f"{path}: cannot read ({e.strerror or e})") from e


def _read_json(path: Path) -> dict:
    config = read_json(path, ChatError, 16 << 20)
    if not isinstance(config, dict):
        raise ChatError(f"{path}: expected a JSON object")
    return config
