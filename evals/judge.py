"""Grade story completions with an OpenAI-compatible model, TinyStories style (``linreg judge``).

Method (Eldan and Li, 2023): story beginnings that stop in the middle of a sentence; each model
writes completions; a grader model sees beginning and completion separated by ``***`` and grades
grammar, creativity, consistency (with the beginning) and plot out of 10, and guesses the writer's
age group. The grading prompt is ``evals/resources/judge_prompt_v1.txt`` (versioned, one file).

Plumbing: the real ``openai`` client (``AsyncOpenAI`` with its own retries off) against any
OpenAI-compatible server; at most ``concurrency`` requests in flight; retries with exponential
backoff and jitter on 429, 408/409, 5xx, timeouts and connection errors (``Retry-After`` honoured);
a request timeout; an on-disk cache keyed by the SHA-256 of (model, messages, params, server: a hash
of the normalised base URL) so a rerun pays nothing twice; token usage counted (fresh and cached separately). A reply that does not parse is
retried once (with a reminder of the format); if that fails too the record is kept as unparsed, left
out of the means and counted. The API key never reaches logs, outputs, cache files or error messages.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from evals.common import (
    DTYPES,
    DEVICES_HELP,
    ConfigError,
    DataError,
    LinregError,
    environment_info,
    fmt,
    load_model_and_tokenizer,
    markdown_table,
    mean_sem,
    model_labels,
    now_iso,
    read_jsonl,
    run_cli,
    setup_logging,
    write_json,
    write_jsonl,
    write_text,
)

log = logging.getLogger("evals.judge")

CATEGORIES = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
DEFAULT_JUDGE_MODEL = "gpt-4o"
PARSE_REMINDER = (
    "Your reply could not be read. Answer again with exactly one JSON object and nothing else, with the "
    'keys "assessment", "grammar", "creativity", "consistency", "plot" (whole numbers 1-10) and '
    '"age_group" (one letter A-F).'
)


class JudgeError(LinregError):
    """The grading API failed for good (after retries), or refused the request."""


# --------------------------------------------------------------------------------------------
# prompt template and story beginnings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgePrompt:
    version: str
    system: str
    user: str
    source: str

    def messages(self, beginning: str, completion: str) -> list[dict]:
        user = self.user.replace("{{beginning}}", beginning.rstrip()).replace("{{completion}}", completion)
        msgs = [{"role": "user", "content": user}]
        if self.system:
            msgs.insert(0, {"role": "system", "content": self.system})
        return msgs


def default_prompt_path() -> Path:
    return Path(str(resources.files("evals") / "resources" / "judge_prompt_v1.txt"))


def load_judge_prompt(path: str | os.PathLike | None = None) -> JudgePrompt:
    """Parse a prompt file (see the default one for the format)."""
    p = Path(path) if path else default_prompt_path()
    if not p.is_file():
        raise DataError(f"judge prompt file not found: {p}")
    version = None
    sections: dict[str, list[str]] = {}
    current = None
    for line in p.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"===\s*(system|user)\s*===\s*", line.strip())
        if m:
            current = m.group(1)
            sections[current] = []
            continue
        if current is None:
            if line.startswith("#") or not line.strip():
                continue
            mv = re.fullmatch(r"version:\s*(\S+)\s*", line)
            if mv:
                version = mv.group(1)
                continue
            raise DataError(f"{p}: unexpected line before the first section: {line!r}")
        sections[current].append(line)
    if version is None:
        raise DataError(f"{p}: no 'version: N' line")
    if "user" not in sections:
        raise DataError(f"{p}: no '=== user ===' section")
    user = "\n".join(sections["user"]).strip()
    for ph in ("{{beginning}}", "{{completion}}"):
        if ph not in user:
            raise DataError(f"{p}: the user section lacks the placeholder {ph}")
    return JudgePrompt(version, "\n".join(sections.get("system", [])).strip(), user, str(p))


def default_beginnings_path() -> Path:
    return Path(str(resources.files("evals") / "resources" / "story_beginnings.jsonl"))


def load_beginnings(path: str | os.PathLike | None = None) -> list[dict]:
    """Story beginnings: JSONL with ``text`` (or ``beginning``/``prompt``) and optional ``id``, or a
    .txt file with one beginning per line."""
    p = Path(path) if path else default_beginnings_path()
    if not p.is_file():
        raise DataError(f"prompts file not found: {p}")
    out = []
    if p.suffix.lower() == ".txt":
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                out.append({"id": f"{p.stem}-{len(out) + 1:03d}", "text": line.rstrip()})
    else:
        for i, row in enumerate(read_jsonl(p)):
            text = next((row[k] for k in ("text", "beginning", "prompt") if k in row), None)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{p}: row {i + 1} has no non-empty 'text' (or 'beginning'/'prompt') field")
            out.append({"id": str(row.get("id", f"{p.stem}-{i + 1:03d}")), "text": text.rstrip()})
    if not out:
        raise DataError(f"{p}: no story beginnings")
    ids = [b["id"] for b in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"{p}: duplicate ids {sorted(k for k, v in Counter(ids).items() if v > 1)}")
    return out


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def generate_completions(model, tokenizer, beginnings: list[dict], *, n_per_prompt: int = 1,
                         max_new_tokens: int = 200, temperature: float = 1.0, top_p: float = 1.0,
                         batch_size: int = 16, seed: int = 0, progress: bool = True) -> list[dict]:
    """Batched sampling (left padding) of ``n_per_prompt`` completions per beginning.

    Returns records ``{"prompt_id", "sample", "beginning", "completion", "n_new_tokens"}``.
    ``temperature <= 0`` means greedy decoding.
    """
    import torch
    from tqdm.auto import tqdm

    if n_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("n_per_prompt, max_new_tokens and batch_size must be >= 1")
    jobs = [(b, s) for b in beginnings for s in range(n_per_prompt)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    try:
        bar = tqdm(total=len(jobs), desc="generating", unit="story", disable=not progress)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            enc = tokenizer([b["text"] for b, _ in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False)
            with torch.inference_mode():
                gen = model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            for (b, s), row in zip(chunk, new):
                ids = row.tolist()
                n = len(ids)
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids:
                    n = ids.index(tokenizer.eos_token_id)
                text = tokenizer.decode(ids[:n], skip_special_tokens=True)
                out.append({"prompt_id": b["id"], "sample": s, "beginning": b["text"], "completion": text,
                            "n_new_tokens": n})
            bar.update(len(chunk))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
    return out


# --------------------------------------------------------------------------------------------
# reply parsing
# --------------------------------------------------------------------------------------------
def _json_objects(text: str):
    """Every top-level JSON object (a dict) embedded in ``text``, in order."""
    start = text.find("{")
    while start != -1:
        depth, in_str, esc, end = 0, False, False, None
        for i in range(start, len(text)):
            c = text[i]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start:i + 1])
                    except json.JSONDecodeError:
                        break
                    if isinstance(obj, dict):
                        yield obj
                        end = i + 1
                    break
        start = text.find("{", end if end is not None else start + 1)


_OUT_OF_10 = r"(?:\s*(?:/|out\s+of)\s*10(?![\d.]))?"  # "7/10", "7 out of 10"


def _grade(v) -> float | None:
    """A grade in 0..10 from a number or a string such as "7", "7/10", "7 out of 10"; else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        m = re.fullmatch(rf"\s*(\d+(?:\.\d+)?){_OUT_OF_10}\s*\.?\s*", v, re.I)
        if not m:
            return None
        v = float(m.group(1))
    if isinstance(v, (int, float)) and 0 <= v <= 10:
        return float(v)
    return None


def _age_ranges() -> dict[str, tuple[int, int]]:
    """Ages covered by each group of AGE_GROUPS ("3 or under" -> (0, 3), "4-5" -> (4, 5))."""
    out = {}
    for letter, desc in AGE_GROUPS.items():
        nums = [int(n) for n in re.findall(r"\d+", desc)]
        out[letter] = (0, nums[0]) if "under" in desc else (min(nums), max(nums))
    return out


AGE_RANGES = _age_ranges()


def _age_group(value) -> str | None:
    """The age-group letter A-F from what a grader wrote: "C", "(C)", "C: 6-7", "Age group: C", "group C",
    an age range or age ("6-7", "6 to 7 years", 7, "3 or under") mapped to the group that holds it, or one
    standalone capital letter A-F. None when nothing (or something ambiguous) is found."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    m = re.fullmatch(r"\(?([A-Fa-f])\)?[.:]?", text)  # just the letter
    if m:
        return m.group(1).upper()
    m = re.match(r"\(?([A-F])(?:\)|\s*[:.]|\s*[-\u2013(]|\s*$)", text)  # "C: 6-7", "(C) 6-7", "C (6-7)"
    if m:
        return m.group(1)
    m = re.search(r"\bgroup\W{0,3}([A-Fa-f])\b", text, re.I)  # "Age group: C"
    if m:
        return m.group(1).upper()
    nums = [int(n) for n in re.findall(r"\d+", text)]
    if nums:
        lo, hi = min(nums), max(nums)
        found = [g for g, (a, b) in AGE_RANGES.items() if a <= lo and hi <= b]
        return found[0] if len(found) == 1 else None
    letters = set(re.findall(r"\b([A-F])\b", text))
    return letters.pop() if len(letters) == 1 else None


def _grades_from_object(obj: dict) -> tuple[dict, object, object]:
    """(grades by category, age value, assessment) from a reply object; the keys may sit one level down,
    e.g. ``{"grades": {"grammar": 8, ...}, "age_group": "C"}`` (top-level keys win)."""
    lower = {str(k).lower().strip(): v for k, v in obj.items()}
    for v in obj.values():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                lower.setdefault(str(k2).lower().strip(), v2)
    grades = {cat: _grade(lower.get(cat)) for cat in CATEGORIES}
    age = next((lower[k] for k in ("age_group", "age group", "agegroup", "age") if k in lower), None)
    return grades, age, lower.get("assessment")


def _grades_from_lines(reply: str) -> tuple[dict, object]:
    """``name: N`` / ``name - N/10`` / ``name: N out of 10`` lines and an ``Age group: ...`` line."""
    grades = {}
    for cat in CATEGORIES:
        m = re.search(rf"\b{cat}\b(?:\s+(?:score|grade|rating))?\W{{0,5}}(\d+(?:\.\d+)?){_OUT_OF_10}", reply, re.I)
        grades[cat] = _grade(m.group(1)) if m else None
    m = re.search(r"\bage[ _]?group\b\W{0,5}([^\n]*)", reply, re.I) or re.search(r"\bage\b\W{0,5}([^\n]*)", reply,
                                                                                    re.I)
    return grades, (m.group(1) if m else None)


def parse_grades(reply: str) -> dict | None:
    """Grades from a grader reply: the JSON object the prompt asks for (keys possibly one level down),
    else ``name: N`` lines (``N``, ``N/10`` or ``N out of 10``).

    Returns ``{"grammar", "creativity", "consistency", "plot", "age_group", "assessment"}`` (grades as
    floats in 0..10, age group a letter A-F or None) or None when any grade is missing. A reply whose
    JSON object holds an out-of-range or unreadable grade is refused (None), not read some other way.
    """
    if not isinstance(reply, str) or not reply.strip():
        return None
    result = None
    for obj in _json_objects(reply):
        grades, age, assessment = _grades_from_object(obj)
        if all(grades[c] is not None for c in CATEGORIES):
            result = grades, age, assessment
            break
        lower = {str(k).lower().strip() for k in obj} | {str(k).lower().strip() for v in obj.values()
                                                        if isinstance(v, dict) for k in v}
        if any(c in lower and grades[c] is None for c in CATEGORIES):
            return None  # a grade is there but out of range or not a number: malformed
    if result is None:  # no JSON object with the four grades: look for lines
        grades, age = _grades_from_lines(reply)
        if any(grades[c] is None for c in CATEGORIES):
            return None
        result = grades, age, None
    grades, age, assessment = result
    grades["age_group"] = _age_group(age)
    grades["assessment"] = assessment if isinstance(assessment, str) else None
    return grades


# --------------------------------------------------------------------------------------------
# secrets, cache, API client
# --------------------------------------------------------------------------------------------
class Redactor(logging.Filter):
    """Replaces secrets in strings and in log records (installed on the root handlers)."""

    def __init__(self, secrets: list[str | None]):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text) -> str:
        text = str(text)
        for s in self.secrets:
            text = text.replace(s, "[REDACTED]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                msg = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is not ours to fix
                msg = str(record.msg)
            red = self(msg)
            if record.exc_info and record.exc_info[1] is not None:
                # render the traceback now, redacted, so the handler does not print the raw one
                import traceback

                red += "\n" + self("".join(traceback.format_exception(*record.exc_info)))
                record.exc_info = None
                record.exc_text = None
            record.msg, record.args = red, ()
        return True

    def install(self) -> None:
        for h in logging.getLogger().handlers:
            h.addFilter(self)

    def uninstall(self) -> None:
        for h in logging.getLogger().handlers:
            h.removeFilter(self)


OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # what the openai client uses without a base URL


def normalize_base_url(base_url: str | None) -> str:
    """The server part of a base URL that tells servers apart: scheme, host, port (default ports dropped)
    and path, lower-cased host, no trailing slash; user name, password, query and fragment removed (they
    may hold credentials). None means OpenAI's default."""
    from urllib.parse import urlsplit

    url = (base_url or OPENAI_DEFAULT_BASE_URL).strip()
    parts = urlsplit(url if "://" in url else "https://" + url)
    scheme = (parts.scheme or "https").lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def server_id(base_url: str | None) -> str:
    """SHA-256 of :func:`normalize_base_url`: part of the cache key, so that two servers serving a model of
    the same name do not share cached grades (the URL itself is never stored)."""
    return hashlib.sha256(normalize_base_url(base_url).encode("utf-8")).hexdigest()


def request_key(request: dict, server: str | None = None) -> str:
    """SHA-256 of the canonical JSON of {model, messages, params}, plus the :func:`server_id` when given."""
    blob = json.dumps(request if server is None else {**request, "server": server}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Grader replies on disk, one JSON file per request key (``ROOT/ab/abcdef....json``).

    Files hold the request (model, messages, params), the reply text, the token usage and the time;
    never an API key or a base URL. ``root=None`` disables caching.
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root).expanduser() if root else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        p = self._path(key)
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable cache entry %s", p)
            return None
        return obj if isinstance(obj, dict) and isinstance(obj.get("content"), str) else None

    def put(self, key: str, request: dict, content: str, usage: dict) -> None:
        if self.root is None:
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}.{random.randrange(1 << 30)}")
        tmp.write_text(json.dumps({"key": key, "request": request, "content": content, "usage": usage,
                                   "created": now_iso()}, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, p)


@dataclass
class JudgeConfig:
    """Grader settings. ``api_key``/``base_url`` default to OPENAI_API_KEY / OPENAI_BASE_URL."""

    model: str = DEFAULT_JUDGE_MODEL
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 400
    token_param: str = "max_tokens"
    seed: int | None = None
    cache_dir: str | None = None

    def resolved(self) -> "JudgeConfig":
        cfg = JudgeConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        cfg.api_key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
        cfg.base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None
        if not cfg.api_key:
            raise ConfigError("no API key: set OPENAI_API_KEY (or pass --api-key); for a local server that "
                              "does not check keys any placeholder string will do")
        if cfg.concurrency < 1 or cfg.max_retries < 0 or cfg.timeout <= 0:
            raise ConfigError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        if cfg.token_param not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(f"token_param must be max_tokens or max_completion_tokens, not {cfg.token_param!r}")
        return cfg

    def params(self) -> dict:
        p = {"temperature": self.temperature, self.token_param: self.max_tokens}
        if self.seed is not None:
            p["seed"] = self.seed
        return p

    def public(self) -> dict:
        """Settings for result files: everything but the key."""
        d = asdict(self)
        d.pop("api_key")
        return d


@dataclass
class UsageStats:
    requests_sent: int = 0
    responses_ok: int = 0
    cache_hits: int = 0
    retries: int = 0
    parse_retries: int = 0
    unparsed: int = 0
    errors_by_status: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["errors_by_status"] = {str(k): v for k, v in sorted(self.errors_by_status.items(), key=str)}
        d["total_tokens"] = self.prompt_tokens + self.completion_tokens
        return d


class Grader:
    """Async grading client: concurrency limit, retries with backoff, cache, usage counts."""

    def __init__(self, config: JudgeConfig, prompt: JudgePrompt | None = None):
        self.config = config.resolved()
        self.prompt = prompt or load_judge_prompt()
        self.cache = ResponseCache(self.config.cache_dir)
        self.redact = Redactor([self.config.api_key])
        self._server = server_id(self.config.base_url)
        self.stats = UsageStats()
        self._client = None
        self._sem: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------------------------
    def _make_client(self):
        import openai

        return openai.AsyncOpenAI(api_key=self.config.api_key, base_url=self.config.base_url,
                                  max_retries=0, timeout=self.config.timeout)

    def _backoff(self, attempt: int, exc) -> float:
        delay = min(self.config.backoff_max, self.config.backoff_base * (2 ** attempt))
        delay *= 0.5 + random.random() / 2  # jitter: spread simultaneous retries
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is not None:
            try:
                if headers.get("retry-after-ms"):
                    delay = float(headers["retry-after-ms"]) / 1000
                elif headers.get("retry-after"):
                    delay = float(headers["retry-after"])
            except (TypeError, ValueError):
                pass
        return max(0.0, min(delay, self.config.backoff_max))

    async def chat(self, messages: list[dict]) -> tuple[str, dict, bool]:
        """One grader reply for ``messages``: (content, usage, from_cache)."""
        import openai

        request = {"model": self.config.model, "messages": messages, "params": self.config.params()}
        key = request_key(request, self._server)  # the file stores the request, not the server
        hit = self.cache.get(key)
        if hit is not None:
            usage = hit.get("usage") or {}
            self.stats.cache_hits += 1
            self.stats.cached_prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.cached_completion_tokens += int(usage.get("completion_tokens") or 0)
            return hit["content"], usage, True
        if self._client is None:
            self._client = self._make_client()
        assert self._sem is not None
        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                     openai.APIConnectionError)
        async with self._sem:
            for attempt in range(self.config.max_retries + 1):
                self.stats.requests_sent += 1
                try:
                    resp = await self._client.chat.completions.create(
                        model=self.config.model, messages=messages, **self.config.params())
                except openai.APIStatusError as exc:
                    status = exc.status_code
                    self.stats.errors_by_status[status] += 1
                    if not (isinstance(exc, retryable) or status in (408, 409, 429) or status >= 500):
                        raise JudgeError(f"grader request refused (HTTP {status}): {self.redact(_msg(exc))}") from None
                    err = exc
                except retryable as exc:  # timeouts, connection errors
                    kind = "timeout" if isinstance(exc, openai.APITimeoutError) else "connection"
                    self.stats.errors_by_status[kind] += 1
                    err = exc
                else:
                    content = self.redact((resp.choices[0].message.content or "") if resp.choices else "")
                    u = resp.usage
                    usage = {"prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
                             "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0)}
                    self.stats.responses_ok += 1
                    self.stats.prompt_tokens += usage["prompt_tokens"]
                    self.stats.completion_tokens += usage["completion_tokens"]
                    self.cache.put(key, request, content, usage)
                    return content, usage, False
                if attempt == self.config.max_retries:
                    raise JudgeError(f"grader request failed after {attempt + 1} attempts: "
                                     f"{self.redact(_msg(err))}") from None
                delay = self._backoff(attempt, err)
                self.stats.retries += 1
                log.debug("retry %d in %.2fs after %s", attempt + 1, delay, self.redact(_msg(err)))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def grade_one(self, record: dict) -> dict:
        messages = self.prompt.messages(record["beginning"], record["completion"])
        content, usage, cached = await self.chat(messages)
        parsed = parse_grades(content)
        attempts = 1
        if parsed is None:
            self.stats.parse_retries += 1
            retry_msgs = messages + [{"role": "assistant", "content": content},
                                     {"role": "user", "content": PARSE_REMINDER}]
            content2, usage2, cached2 = await self.chat(retry_msgs)
            parsed, attempts = parse_grades(content2), 2
            content, cached = content2, cached and cached2
            usage = {k: int(usage.get(k, 0)) + int(usage2.get(k, 0)) for k in ("prompt_tokens", "completion_tokens")}
        if parsed is None:
            self.stats.unparsed += 1
        out = dict(record)
        out.update({
            "parsed": parsed is not None,
            "grades": {c: parsed[c] for c in CATEGORIES} if parsed else None,
            "age_group": parsed["age_group"] if parsed else None,
            "assessment": parsed["assessment"] if parsed else None,
            "reply": self.redact(content),
            "attempts": attempts,
            "cached": cached,
            "usage": usage,
            "prompt_version": self.prompt.version,
            "judge_model": self.config.model,
        })
        return out

    async def grade_all(self, records: list[dict], progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        self._sem = asyncio.Semaphore(self.config.concurrency)
        t0 = time.perf_counter()
        bar = tqdm(total=len(records), desc="grading", unit="story", disable=not progress)

        async def one(i, rec):
            res = await self.grade_one(rec)
            bar.update(1)
            return i, res

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(records)]
        results: list = [None] * len(records)
        try:
            for fut in asyncio.as_completed(tasks):
                i, res = await fut
                results[i] = res
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            self.stats.seconds += time.perf_counter() - t0
            if self._client is not None:
                await self._client.close()
                self._client = None
        return results


def _msg(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def grade_records(records: list[dict], config: JudgeConfig, prompt: JudgePrompt | None = None,
                  progress: bool = True) -> tuple[list[dict], UsageStats]:
    """Synchronous wrapper: grade ``records`` (each with ``beginning`` and ``completion``)."""
    grader = Grader(config, prompt)
    grader.redact.install()
    try:
        graded = asyncio.run(grader.grade_all(records, progress=progress))
    finally:
        grader.redact.uninstall()
    return graded, grader.stats


# --------------------------------------------------------------------------------------------
# aggregation and outputs
# --------------------------------------------------------------------------------------------
def summarize(graded: list[dict]) -> list[dict]:
    """Per model: mean, standard error and n of every category (parsed records only), overall mean
    (of the four grades per record), age-group counts, unparsed count."""
    labels = list(dict.fromkeys(r["model"] for r in graded))
    out = []
    for label in labels:
        recs = [r for r in graded if r["model"] == label]
        ok = [r for r in recs if r["parsed"]]
        scores = {}
        for cat in CATEGORIES:
            m, se, n = mean_sem([r["grades"][cat] for r in ok])
            scores[cat] = {"mean": m, "sem": se, "n": n}
        m, se, n = mean_sem([sum(r["grades"][c] for c in CATEGORIES) / len(CATEGORIES) for r in ok])
        scores["overall"] = {"mean": m, "sem": se, "n": n}
        ages = Counter(r["age_group"] for r in ok if r["age_group"])
        out.append({
            "label": label,
            "model": recs[0].get("model_path", label),
            "n_records": len(recs),
            "n_parsed": len(ok),
            "n_unparsed": len(recs) - len(ok),
            "scores": scores,
            "age_groups": {g: ages.get(g, 0) for g in AGE_GROUPS},
            "mean_new_tokens": (sum(r.get("n_new_tokens", 0) for r in recs) / len(recs)) if recs else None,
        })
    return out


def render_markdown(result: dict) -> str:
    headers = ["model"] + [c.capitalize() for c in CATEGORIES] + ["Overall", "age group (mode)", "unparsed", "n"]
    rows = []
    for m in result["models"]:
        s = m["scores"]
        ages = m["age_groups"]
        mode = max(ages, key=ages.get) if any(ages.values()) else None
        rows.append([m["label"]] + [fmt(s[c]["mean"], 2, s[c]["sem"]) for c in CATEGORIES + ("overall",)]
                    + [f"{mode} ({AGE_GROUPS[mode]})" if mode else "–", str(m["n_unparsed"]), str(m["n_records"])])
    u = result["usage"]
    j = result["judge"]
    lines = [f"# Story completions graded by {j['model']} (prompt v{result['prompt']['version']})", "",
             "Mean ± standard error over graded completions, grades out of 10; unparsed replies are "
             "left out of the means.", "", markdown_table(headers, rows),
             f"Requests: {u['requests_sent']} sent, {u['cache_hits']} from cache, {u['retries']} retries, "
             f"{u['parse_retries']} parse retries. Tokens: {u['prompt_tokens']} prompt + "
             f"{u['completion_tokens']} completion (fresh); {u['cached_prompt_tokens']} + "
             f"{u['cached_completion_tokens']} served from cache."]
    return "\n".join(lines) + "\n"


def load_completions(path: str | os.PathLike, default_label: str | None = None) -> list[dict]:
    """Completions to grade: JSONL rows with ``beginning`` and ``completion`` (and ``model`` label,
    ``prompt_id``, ``sample`` when present) - e.g. a ``completions.jsonl`` written by this command."""
    rows = read_jsonl(path)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("beginning"), str) or not isinstance(r.get("completion"), str):
            raise DataError(f"{path}: row {i + 1} needs string fields 'beginning' and 'completion'")
        out.append({"model": str(r.get("model") or default_label or Path(path).stem),
                    "prompt_id": str(r.get("prompt_id", i)), "sample": int(r.get("sample", 0)),
                    "beginning": r["beginning"], "completion": r["completion"],
                    **({"n_new_tokens": r["n_new_tokens"]} if "n_new_tokens" in r else {}),
                    **({"model_path": r["model_path"]} if "model_path" in r else {})})
    if not out:
        raise DataError(f"{path}: no completions")
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg judge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate story completions with one or several models and grade them with an OpenAI-compatible "
            "model, TinyStories style: grammar, creativity, consistency and plot out of 10, plus the "
            "writer's age group.\nWrites completions.jsonl, judge_records.jsonl (raw graded records), "
            "judge_results.json and judge_results.md to --output-dir."),
        epilog=(
            "environment:\n"
            "  OPENAI_API_KEY     API key (preferred over --api-key, which other users can see in `ps`)\n"
            "  OPENAI_BASE_URL    base URL of any OpenAI-compatible server (e.g. vLLM: http://host:8000/v1)\n"
            "  LINREG_JUDGE_MODEL default grader model (else gpt-4o)\n"
            "  LINREG_CACHE_DIR   cache root (default ~/.cache/linreg); replies go to <root>/judge\n"
            "examples:\n"
            "  linreg judge --model runs/baseline --model runs/mse -o out/judge --n-per-prompt 4\n"
            "  linreg judge --completions out/judge/completions.jsonl --judge-model gpt-4-turbo -o out/judge2\n"
            "  linreg judge --model runs/baseline --generate-only -o out/gen   # no API needed"),
    )
    g = p.add_argument_group("completions (give --model and/or --completions)")
    g.add_argument("--model", action="append", default=[], metavar="PATH_OR_NAME",
                   help="model folder, run folder (its hf/ export) or hub name; repeat for several models")
    g.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="label of each --model, in the same order (default: folder name)")
    g.add_argument("--completions", action="append", default=[], metavar="FILE",
                   help="grade existing completions (JSONL with beginning, completion and model label); repeatable")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="story beginnings: JSONL with 'text' and optional 'id', or .txt one per line "
                        "(default: the 34 beginnings shipped in evals/resources/story_beginnings.jsonl)")
    g.add_argument("--limit-prompts", type=int, default=None, help="use only the first N beginnings")
    g.add_argument("--n-per-prompt", type=int, default=1, help="completions per beginning and model (default: 1)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens per completion (default: 200)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    g.add_argument("--gen-batch-size", type=int, default=16, help="beginnings per generate() call (default: 16)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--device", default="auto", help=f"device for generation: {DEVICES_HELP}")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype for generation (default: auto)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code from the hub")
    g.add_argument("--generate-only", action="store_true", help="write completions.jsonl and stop (no grading)")
    j = p.add_argument_group("grader")
    j.add_argument("--judge-model", default=None,
                   help=f"grader model name (default: $LINREG_JUDGE_MODEL or {DEFAULT_JUDGE_MODEL})")
    j.add_argument("--base-url", default=None, help="API base URL (default: $OPENAI_BASE_URL, else OpenAI's)")
    j.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY; never written anywhere)")
    j.add_argument("--prompt-template", default=None, metavar="FILE",
                   help="grading prompt file (default: evals/resources/judge_prompt_v1.txt)")
    j.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default: 8)")
    j.add_argument("--max-retries", type=int, default=6,
                   help="retries per request on 429/408/409/5xx/timeouts/connection errors (default: 6)")
    j.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    j.add_argument("--backoff-base", type=float, default=1.0,
                   help="first retry delay in seconds, doubled each retry, with jitter (default: 1.0)")
    j.add_argument("--backoff-max", type=float, default=60.0, help="longest retry delay in seconds (default: 60)")
    j.add_argument("--judge-temperature", type=float, default=0.0, help="grader temperature (default: 0)")
    j.add_argument("--judge-max-tokens", type=int, default=400, help="grader reply length limit (default: 400)")
    j.add_argument("--token-param", default="max_tokens", choices=["max_tokens", "max_completion_tokens"],
                   help="request field for the reply limit (newer OpenAI models want max_completion_tokens)")
    j.add_argument("--judge-seed", type=int, default=None, help="seed sent to the grader, if it supports one")
    j.add_argument("--cache-dir", default=None,
                   help="reply cache folder (default: $LINREG_CACHE_DIR/judge or ~/.cache/linreg/judge)")
    j.add_argument("--no-cache", action="store_true", help="neither read nor write the reply cache")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output-dir", default="eval_results/judge", help="output folder (default: eval_results/judge)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    o.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def default_cache_dir() -> Path:
    root = os.environ.get("LINREG_CACHE_DIR") or str(Path.home() / ".cache" / "linreg")
    return Path(root).expanduser() / "judge"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    secrets = [args.api_key, os.environ.get("OPENAI_API_KEY")]

    def body() -> int:
        if not args.model and not args.completions:
            raise ConfigError("nothing to grade: give --model (to generate) and/or --completions FILE")
        labels = model_labels(args.model, args.label)
        out_dir = Path(args.output_dir)
        prompt = load_judge_prompt(args.prompt_template)
        records: list[dict] = []
        for f in args.completions:
            records += load_completions(f)
        clash = sorted(set(labels) & {r["model"] for r in records})
        if clash:
            raise ConfigError(f"labels {clash} name both a --model and completions in --completions; "
                              "rename with --label")
        cfg = resolved = None
        if not args.generate_only:  # grader settings (API key ...) checked before any generation
            cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
            cfg = JudgeConfig(model=args.judge_model or os.environ.get("LINREG_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL,
                              base_url=args.base_url, api_key=args.api_key, concurrency=args.concurrency,
                              max_retries=args.max_retries, timeout=args.timeout, backoff_base=args.backoff_base,
                              backoff_max=args.backoff_max, temperature=args.judge_temperature,
                              max_tokens=args.judge_max_tokens, token_param=args.token_param,
                              seed=args.judge_seed, cache_dir=str(cache_dir) if cache_dir else None)
            resolved = cfg.resolved()
        if args.model:
            beginnings = load_beginnings(args.prompts)[: args.limit_prompts or None]
            generated = []
            for path, label in zip(args.model, labels):
                log.info("generating with %s (%s)", label, path)
                model, tok = load_model_and_tokenizer(path, dtype=args.dtype, device=args.device,
                                                      trust_remote_code=args.trust_remote_code)
                recs = generate_completions(model, tok, beginnings, n_per_prompt=args.n_per_prompt,
                                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                            top_p=args.top_p, batch_size=args.gen_batch_size, seed=args.seed,
                                            progress=not args.no_progress)
                generated += [{"model": label, "model_path": str(path), **r} for r in recs]
                del model
            write_jsonl(out_dir / "completions.jsonl", generated)
            records += generated
        if args.generate_only:
            if not args.quiet:
                print(f"wrote {len(records)} completions to {out_dir / 'completions.jsonl'}")
            return 0
        graded, stats = grade_records(records, cfg, prompt, progress=not args.no_progress)
        result = {
            "kind": "judge",
            "version": 1,
            "judge": {k: v for k, v in resolved.public().items()},
            "prompt": {"version": prompt.version, "file": prompt.source},
            "generation": ({"n_prompts": len(beginnings), "prompts_file": str(args.prompts or default_beginnings_path()),
                            "n_per_prompt": args.n_per_prompt, "max_new_tokens": args.max_new_tokens,
                            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
                           if args.model else None),
            "models": summarize(graded),
            "usage": stats.to_dict(),
            "meta": {"created": now_iso(), **environment_info()},
        }
        write_jsonl(out_dir / "judge_records.jsonl", graded)
        write_json(out_dir / "judge_results.json", result)
        md = render_markdown(result)
        write_text(out_dir / "judge_results.md", md)
        if not args.quiet:
            print(md)
            print(f"wrote {out_dir / 'judge_results.json'}, {out_dir / 'judge_results.md'}, "
                  f"{out_dir / 'judge_records.jsonl'}")
        return 0

    redactor = Redactor(secrets)
    redactor.install()
    try:
        return run_cli(body)
    except Exception as exc:  # unexpected errors: print them without the key, then re-raise redacted
        raise RuntimeError(redactor(_msg(exc))) from None
    finally:
        redactor.uninstall()


if __name__ == "__main__":
    raise SystemExit(main())
