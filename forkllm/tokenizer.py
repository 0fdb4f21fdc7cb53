"""Tokenizer and chat template, from an HF tokenizer.json or from GGUF metadata.

The hot path uses the Rust `tokenizers` library directly. A GGUF file carries its vocabulary as
metadata; converting that to a `tokenizers` object is done once by transformers (the library made
for it) and the result is cached as a plain tokenizer.json, so warm starts never import
transformers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

META_FILE = "forkllm_tokenizer.json"
# Compiled chat templates kept: the model's own plus a few passed per call (an HTTP request may
# carry its own), so a stream of distinct templates cannot grow memory without bound.
_TEMPLATE_CACHE_SIZE = 8


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render. Templates are code run on the caller's
    messages (they `raise_exception` on roles they refuse, index missing keys, ...), so this is
    bad input, not an engine fault; `from_request` says whether the template came with the call
    (blame it) or is the model's own (blame the messages)."""

    def __init__(self, message: str, from_request: bool) -> None:
        super().__init__(message)
        self.from_request = from_request


class Tokenizer:
    """Encode/decode and render chat templates the way HF `apply_chat_template` does."""

    def __init__(
        self,
        backend: RustTokenizer,
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        prefix_ids: list[int],
        suffix_ids: list[int],
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Special tokens the tokenizer adds around plain text (e.g. BOS for Llama; none for SmolLM2).
        self.prefix_ids = list(prefix_ids)
        self.suffix_ids = list(suffix_ids)
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template_cache: dict[str, Any] = {}
        self._reads_cache: dict[str, frozenset[str]] = {}  # template -> the variables it reads

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a folder holding tokenizer.json (+ tokenizer_config.json or our own meta file)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = RustTokenizer.from_file(str(tok_file))
        meta_file = path / META_FILE
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            return cls(backend, **meta)
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        prefix, suffix = _special_affixes(backend)
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            prefix_ids=prefix,
            suffix_ids=suffix,
        )

    @classmethod
    def from_gguf(cls, gguf_path: str | Path) -> Tokenizer:
        """Convert a GGUF vocabulary with transformers (slow, seconds): call once and `save` it."""
        from transformers import AutoTokenizer

        gguf_path = Path(gguf_path)
        hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        backend = hf.backend_tokenizer
        plain = hf("a", add_special_tokens=False)["input_ids"]
        full = hf("a")["input_ids"]
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        return cls(
            backend,
            chat_template=getattr(hf, "chat_template", None),
            bos_token=hf.bos_token,
            eos_token=hf.eos_token,
            prefix_ids=full[:start],
            suffix_ids=full[start + len(plain) :],
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        meta = dict(
            chat_template=self.chat_template,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            prefix_ids=self.prefix_ids,
            suffix_ids=self.suffix_ids,
        )
        (path / META_FILE).write_text(json.dumps(meta))

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = self.prefix_ids + ids + self.suffix_ids
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        if not add_special_tokens:
            return [e.ids for e in encs]
        return [self.prefix_ids + e.ids + self.suffix_ids for e in encs]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's Jinja template, as HF transformers does (keyword
        arguments, e.g. `tools`, reach the template as variables). For tools and tool turns in
        templates that know nothing of them, see forkllm.tools.prompt.render_chat."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template; pass chat_template= or use generate()")
        _validate_messages(messages)
        try:
            compiled = self._compiled(template)
            return str(
                compiled.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                    **kwargs,
                )
            )
        except Exception as e:  # any error inside template code: syntax, raise_exception, TypeError
            origin = "chat_template" if chat_template else "the model's chat template"
            raise ChatTemplateError(
                f"{origin} failed on these messages: {type(e).__name__}: {e}",
                from_request=bool(chat_template),
            ) from e

    def _compiled(self, template: str) -> Any:
        compiled = self._template_cache.get(template)
        if compiled is None:
            compiled = _jinja_env().from_string(template)
            if len(self._template_cache) >= _TEMPLATE_CACHE_SIZE:  # callers' templates vary
                self._template_cache.pop(next(iter(self._template_cache)))
            self._template_cache[template] = compiled
        return compiled

    def template_reads(self, name: str, chat_template: str | None = None) -> bool:
        """Whether the template (the model's, or `chat_template`) reads the variable `name`
        (e.g. `tools`) from its context. A template that does not compile reads nothing."""
        template = chat_template or self.chat_template
        if template is None:
            return False
        names = self._reads_cache.get(template)
        if names is None:
            try:
                from jinja2 import meta

                names = frozenset(meta.find_undeclared_variables(_jinja_env().parse(template)))
            except Exception:  # a broken template fails, with its own message, when rendered
                names = frozenset()
            if len(self._reads_cache) >= _TEMPLATE_CACHE_SIZE:
                self._reads_cache.pop(next(iter(self._reads_cache)))
            self._reads_cache[template] = names
        return name in names


VALID_ROLES = ("system", "user", "assistant", "tool", "developer")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in VALID_ROLES:
            raise ValueError(f"messages[{i}].role {m['role']!r} is invalid; expected one of {VALID_ROLES}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" for p in content
            ):
                m["content"] = "".join(p.get("text", "") for p in content)
            else:
                raise ValueError(f"messages[{i}].content must be a string (or a list of text parts)")


def _jinja_env() -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):  # {"content": "<s>", ...}
        return tok.get("content")
    return tok


def _special_affixes(backend: RustTokenizer) -> tuple[list[int], list[int]]:
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    if not plain or plain[0] not in full:
        return [], []
    start = full.index(plain[0])
    return full[:start], full[start + len(plain) :]
