"""An OpenAI-compatible chat-completions client: retries with back-off, a JSONL answer cache, a thread pool.

Used by the LLM judge (METHOD_SPEC 5.3) and the data generators (mule.generators). Standard library only, so
any local server (vLLM, llama.cpp, Ollama) or a hosted API works. The API key is read from the environment variable named in the config at
request time and never stored on the client: it cannot reach an error message, a log line, the cache or a repr.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mule.errors import MuleError

log = logging.getLogger(__name__)

BASE_URL_ENV = "MULE_LLM_BASE_URL"
MODEL_ENV = "MULE_LLM_MODEL"
MAX_BACKOFF = 30.0  # seconds; the doubling back-off stops growing here
MAX_RETRY_AFTER = 300.0  # seconds; a server asking for a longer pause is not waited for that long
RETRY_STATUS = {408, 429}  # and every 5xx
# A 400/413/422 usually means this one request is bad (e.g. a prompt past the context length): that
# request fails and the others go on. 401/403/404 mean every request will fail: the run stops.
PER_REQUEST_STATUS = {400, 413, 422}
STATUS_HINTS = {
    401: "check the API key in the environment variable {env}",
    403: "the API key in {env} is not allowed to use this model",
    404: "check the base URL (it usually ends in /v1) and the model name",
}


class RequestFailed(MuleError):
    """One request failed for good (retries spent, request rejected, reply malformed); complete_many gives None."""


@dataclass
class ClientConfig:
    """Where and how to ask the LLM. base_url and model fall back to MULE_LLM_BASE_URL and MULE_LLM_MODEL."""

    base_url: str | None = None  # e.g. http://localhost:8000/v1
    model: str | None = None
    api_key_env: str = "MULE_LLM_API_KEY"  # the NAME of the variable holding the key; the key is never in a config
    timeout: float = 60.0  # seconds per HTTP request
    max_retries: int = 5  # retries after the first try, on 408/429/5xx, timeouts and connection errors
    backoff: float = 1.0  # seconds before the first retry, doubled each retry, capped at 30; Retry-After wins
    concurrency: int = 4  # requests in flight in complete_many
    temperature: float = 0.0
    max_tokens: int = 256


class _Retryable(Exception):
    """A transient failure worth another try. retry_after: the server's Retry-After in seconds, if it sent one."""

    def __init__(self, reason: str, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.unreachable = unreachable


def cache_key(base_url: str, payload: dict[str, Any]) -> str:
    """sha256 of the request: base_url plus the JSON payload (model, messages, temperature, max_tokens, extras)."""
    return hashlib.sha256(json.dumps({"base_url": base_url, **payload}, sort_keys=True).encode()).hexdigest()


def _resolve(value: str | None, env: str, setting: str) -> str:
    """A setting from the config, else from its environment variable, else a MuleError naming both."""
    value = value or os.environ.get(env)
    if not value:
        raise MuleError(f"no LLM {setting} given: set llm.{setting} in the config or the environment variable {env}")
    return value


def _redact(text: str, secret: str | None) -> str:
    """Text with every occurrence of the secret replaced by '***'."""
    return text.replace(secret, "***") if secret else text


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), or None when absent or unreadable."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _load_cache(path: Path) -> dict[str, str]:
    """Answers cached in a JSONL file of {"key", "response"} lines; unreadable lines (a killed write) are skipped."""
    cache: dict[str, str] = {}
    if not path.exists():
        return cache
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                cache[row["key"]] = row["response"]
            except (ValueError, KeyError, TypeError):
                log.warning("skipping unreadable line %d of the LLM cache %s", number, path)
    # a run killed mid-write leaves a line without its newline: end it so the next append starts a fresh line
    if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")
    return cache


class AnswerCache:
    """A thread-safe key -> answer map kept in a JSONL file; each answer is appended (and flushed) as it arrives,
    so a killed job keeps every answer it had. path None: in memory only. hits counts answers served from it."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._answers = _load_cache(self.path) if self.path is not None else {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        with self._lock:
            answer = self._answers.get(key)
            self.hits += answer is not None
            return answer

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            self._answers[key] = answer
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "response": answer}) + "\n")
                    f.flush()


def _content(body: bytes, endpoint: str) -> str:
    """choices[0].message.content of a chat-completions reply; RequestFailed when the reply is not one."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RequestFailed(f"the LLM endpoint {endpoint} sent a reply that is not a chat completion: "
                            f"{body[:200].decode('utf-8', 'replace')!r}") from None
    if not isinstance(content, str):
        raise RequestFailed(f"the LLM endpoint {endpoint} sent a reply without message content "
                            "(a reasoning model may have run out of max_tokens)")
    return content


class ChatClient:
    """POST {base_url}/chat/completions with retries, a JSONL answer cache and concurrent batches.

    failed counts the requests of complete_many that still failed after their retries.
    """

    def __init__(self, config: ClientConfig, cache_path: Path | None = None):
        self.config = config
        self.base_url = _resolve(config.base_url, BASE_URL_ENV, "base_url").rstrip("/")
        self.model = _resolve(config.model, MODEL_ENV, "model")
        if not self.base_url.startswith(("http://", "https://")):
            raise MuleError(f"the LLM base_url must start with http:// or https://, got {self.base_url!r}")
        suffix = "/chat/completions"
        self.endpoint = self.base_url if self.base_url.endswith(suffix) else self.base_url + suffix
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.failed = 0
        self._lock = threading.Lock()
        self.cache = AnswerCache(self.cache_path)

    def __repr__(self) -> str:
        return (f"ChatClient(endpoint={self.endpoint!r}, model={self.model!r}, key_env={self.config.api_key_env!r}, "
                f"cache_path={str(self.cache_path) if self.cache_path else None!r}, failed={self.failed})")

    def complete(self, messages: list[dict], **overrides: Any) -> str:
        """The reply to one chat, from the cache or one retried request. overrides: temperature, max_tokens, ..."""
        payload = {"model": self.model, "messages": messages, "temperature": self.config.temperature,
                   "max_tokens": self.config.max_tokens, **overrides}
        key = cache_key(self.base_url, payload)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        response = self._post_with_retries(payload)
        self.cache.put(key, response)
        return response

    def complete_many(self, requests: list[list[dict]], desc: str = "LLM requests", progress: bool = True,
                      on_done: Callable[[int, str | None], None] | None = None) -> list[str | None]:
        """Replies in input order, config.concurrency at a time; a request that fails for good gives None.

        Errors that doom every request (bad key, wrong URL, endpoint unreachable) stop the batch and are raised.
        on_done(index, reply) is called in this thread as each request finishes (e.g. to update counts).
        """
        results: list[str | None] = [None] * len(requests)
        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool, \
                tqdm(total=len(requests), desc=desc, disable=not progress, unit="req") as bar:
            futures = {pool.submit(self.complete, messages): i for i, messages in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    index = futures[future]
                    try:
                        results[index] = future.result()
                    except RequestFailed as err:
                        errors.append(str(err))
                    if on_done is not None:
                        on_done(index, results[index])
                    bar.update(1)
            except BaseException:
                for future in futures:  # a fatal error: do not start the requests still queued
                    future.cancel()
                raise
        if errors:
            with self._lock:
                self.failed += len(errors)
            log.warning("%d of %d LLM requests failed after retries; first: %s", len(errors), len(requests), errors[0])
        return results

    def _post_with_retries(self, payload: dict[str, Any]) -> str:
        """_post, retried with exponential back-off (or the server's Retry-After) on transient failures."""
        attempts = max(1, self.config.max_retries + 1)
        last = _Retryable("no attempt made")
        for attempt in range(attempts):
            try:
                return self._post(payload)
            except _Retryable as err:
                last = err
                if attempt + 1 == attempts:
                    break
                delay = self._delay(attempt, err.retry_after)
                log.warning("LLM request to %s failed (%s); retry %d/%d in %.2fs",
                            self.endpoint, err.reason, attempt + 1, self.config.max_retries, delay)
                time.sleep(delay)
        if last.unreachable:
            raise MuleError(f"cannot reach the LLM endpoint {self.base_url}: {last.reason} "
                            f"({attempts} attempt{'s' if attempts > 1 else ''})")
        raise RequestFailed(f"the LLM endpoint {self.endpoint} failed {attempts} attempt"
                            f"{'s' if attempts > 1 else ''}; last: {last.reason}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number attempt+1."""
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        return min(self.config.backoff * 2 ** attempt, MAX_BACKOFF)

    def _post(self, payload: dict[str, Any]) -> str:
        """One HTTP request. Raises _Retryable for transient failures, MuleError/RequestFailed for the rest."""
        key = os.environ.get(self.config.api_key_env) or None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(payload).encode(), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err, key) from None
        except TimeoutError:
            raise _Retryable(f"no answer within {self.config.timeout:g}s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise _Retryable(f"no answer within {self.config.timeout:g}s") from None
            raise _Retryable(_redact(str(err.reason), key), unreachable=True) from None
        except (http.client.HTTPException, ConnectionError) as err:
            raise _Retryable(_redact(f"connection error: {type(err).__name__} {err}", key)) from None
        try:
            return _content(body, self.endpoint)
        except RequestFailed as err:
            raise RequestFailed(_redact(str(err), key)) from None

    def _http_error(self, err: urllib.error.HTTPError, key: str | None) -> Exception:
        """The exception for an HTTP error status: retry 408/429/5xx; a 4xx is not retried."""
        status = err.code
        try:
            retry_after = _retry_after(err.headers)
            # the body of 401/403 may echo part of the key: it is never read
            body = "" if status in (401, 403) else err.read(300).decode("utf-8", "replace").strip()
        finally:
            err.close()
        if status in RETRY_STATUS or status >= 500:
            return _Retryable(f"HTTP {status}", retry_after=retry_after)
        detail = _redact(f": {body}" if body else "", key)
        if status in PER_REQUEST_STATUS:
            return RequestFailed(f"the LLM endpoint {self.endpoint} rejected a request with HTTP {status}{detail}")
        hint = STATUS_HINTS.get(status, "").format(env=self.config.api_key_env)
        return MuleError(f"the LLM endpoint {self.endpoint} answered HTTP {status}{detail}" + (f"; {hint}" if hint else ""))
