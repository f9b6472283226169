"""Where `from_pretrained` should read a model from, without waiting on an unreachable hub.

huggingface_hub retries each request to a hub it cannot reach, with back-off, file by file: on a
machine without network, LDM's BERT tokenizer (`bert-base-uncased`) took 3 1/2 minutes to come
back, and under transformers 5 it came back as a tokenizer knowing no words. So the hub is asked
once, with a short timeout, before anything is loaded from it; when it does not answer, a copy in
the Hugging Face cache is read instead, and without one the load fails at once, saying why.
"""
from __future__ import annotations

import logging
import os
import threading

from ldm.diffusers_folder import cache_snapshot

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class ModelUnavailable(OSError):
    """A name that is no folder, and no hub id that is cached or downloadable now; one line."""


def pretrained_source(name: str) -> str:
    """What to pass to `from_pretrained` for `name`: a local folder as it is (a cache's
    models--ORG--NAME folder as the snapshot its refs/main names); a hub id as it is when the hub
    answers, else the id's snapshot in the local Hugging Face cache. ModelUnavailable when none."""
    if os.path.isdir(name):
        return cache_snapshot(name)
    if not _can_be_hub_id(name):  # a path: asking the hub would only delay "no such folder"
        raise ModelUnavailable(f"{name!r}: no such folder (nor can it be a Hugging Face hub id)")
    reason = _why_offline()
    if not reason:
        return name
    cached = _cached_snapshot(name)
    if cached is None:
        from huggingface_hub import constants
        raise ModelUnavailable(f"{name!r} is neither a local folder nor in the Hugging Face cache "
                               f"({constants.HF_HUB_CACHE}), and the hub {reason}")
    logger.info("The Hugging Face hub %s: reading %s from the cache, %s", reason, name, cached)
    return cached


def _why_offline() -> str:
    """Why the hub cannot be asked ('' when it answered): HF_HUB_OFFLINE, or one request without
    retries, with a short timeout, that failed (through a proxy set in the environment, as downloads)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE as huggingface_hub read it on import
        return "is switched off (HF_HUB_OFFLINE)"
    try:
        status = within_probe_time(lambda: get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S).status_code)
    except Exception as err:  # requests' or httpx' errors, by huggingface_hub version: any means "no answer"
        from ldm.util import first_line
        return f"at {constants.ENDPOINT} cannot be reached ({first_line(err)})"
    if status >= 500:  # a proxy that cannot reach it, or the hub down: downloads would retry as for no answer
        return f"at {constants.ENDPOINT} answers HTTP {status}"
    return ""


def url_unreachable(url: str) -> str:
    """Why `url` cannot be downloaded now ('' when it may be): one HEAD request with the short
    timeout, asked for downloaders that would wait without one (OpenAI's clip package)."""
    import http.client
    import urllib.error
    import urllib.request
    try:
        within_probe_time(lambda: urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                                         timeout=PROBE_TIMEOUT_S).close())
    except urllib.error.HTTPError as err:  # 405: no HEAD here, which says nothing of a download
        return "" if err.code == 405 else f"answers HTTP {err.code}"
    except (OSError, ValueError, http.client.HTTPException) as err:  # no answer, or none in HTTP
        from ldm.util import first_line
        return f"cannot be reached ({first_line(err)})"
    return ""


def within_probe_time(request):
    """request()'s result, or TimeoutError when it has not come within twice PROBE_TIMEOUT_S. A
    socket timeout bounds each read only: a proxy or captive portal that trickles a byte now and
    then never trips it, and the one short request would wait for as long as it keeps trickling.
    The request runs in a daemon thread, left behind if it has not ended (it holds one socket)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = request()
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(2 * PROBE_TIMEOUT_S)
    if thread.is_alive():
        raise TimeoutError(f"no whole answer within {2 * PROBE_TIMEOUT_S:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _can_be_hub_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)  # "name" or "org/name" of the characters the hub allows
    except ValueError:
        return False
    return True


def _cached_snapshot(name: str) -> str | None:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError is an OSError)
        return None
