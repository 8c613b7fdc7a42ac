"""Network failures of the retriever, as one small hierarchy every caller can catch."""

from __future__ import annotations


class NetworkError(RuntimeError):
  """A request failed for good (after retries, where retrying made sense), or its answer was unusable."""


class RateLimited(NetworkError):
  def __init__(self, msg: str, retry_after: float | None = None):
    super().__init__(msg)
    self.retry_after = retry_after


class Timeout(NetworkError):
  pass
