"""``labeler browse RUN``: every feature of a run on the review server.

The review server's app (:class:`labeler.review.web.ReviewApp`, with its safety: only
127.0.0.1 on its own port, Host and Origin checks, a strict Content-Security-Policy with
Trusted Types) answers a few more routes:

- ``GET /``: the catalog page (``browse_page.html``): search, filters, sorting, pages;
- ``GET /review``: the review page's queue (the audit first, then disputed features);
- ``GET /api/catalog?q=&category=&...``: one page of matching features
  (:class:`labeler.review.catalog_index.CatalogQuery` lists the parameters; a bad one is a
  400 naming it);
- ``GET /api/facets``: each filter's values with their feature counts, and ``audit``:
  the audited features nobody decided (``todo``) and all of them, for the page's
  "Audit: K to decide" entry (``audit=todo`` lists them in audit order).

``/feature/ID`` stays the review page of one feature (examples heat-highlighted, logit
lens, every judgment and review, the output score, the decision form), so any feature in
the catalog is a click from its review.

The catalog's two routes are answered on a lane of their own, with the index's own
connections, so a search never waits for the store's thread (a decision, a feature's
page). A decision only writes the label store: the index catches up with every review
in the store, whoever made it, before its next answer, recomputing the rows of the
features reviewed since. Whatever happens to the index file, a decision is stored once
and answered as stored.

``POST /api/prompt`` (``labeler browse --model``): a text read by the run's model, the
features that fire most on each token (:mod:`labeler.review.prompt_box`), answered on the
``model`` lane, one at a time (another gets 429 at once, on a lane that only refuses).
"""

from __future__ import annotations

import json
import re

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.catalog_index import BadQuery, CatalogIndex, CatalogQuery
from labeler.review.prompt_box import PROMPT_PATH, PromptBox
from labeler.review.web import (
    Request,
    Response,
    ReviewApp,
    error_response,
    json_response,
    read_page,
)
from labeler.run.data import RunData

BROWSE_PAGE = "browse_page.html"
INDEX_LANE = "index"
_INDEXED = frozenset({"/api/catalog", "/api/facets"})
MODEL_LANE, BUSY_LANE = "model", "model-busy"  # a prompt; a prompt refused while one runs


class CatalogApp(ReviewApp):
    """The review app with the catalog in front; catalog requests go to the ``index``
    lane, the rest to the thread that opened ``store``."""

    lanes = (INDEX_LANE, MODEL_LANE, BUSY_LANE)

    def __init__(
        self,
        run: RunData,
        store: LabelStore,
        rules: DisputeRules,
        reviewer: str,
        index: CatalogIndex,
        prompt: PromptBox | None = None,
    ) -> None:
        super().__init__(run, store, rules, reviewer, include_decided=False)
        self.index = index
        self.catalog = True
        self.browse_page = read_page(BROWSE_PAGE)
        self.prompt = prompt or PromptBox.for_run(run, model=False)
        self.routes = [
            (re.compile(r"/"), {"GET": self._catalog_page}),
            (re.compile(r"/review"), {"GET": self._index}),
            (re.compile(r"/api/catalog"), {"GET": self._catalog}),
            (re.compile(r"/api/facets"), {"GET": self._facets}),
            (re.compile(PROMPT_PATH), {"POST": self.prompt.answer}),
            *self.routes[1:],
        ]

    def lane(self, request: Request) -> str | None:
        if request.path == PROMPT_PATH and request.method == "POST":
            return MODEL_LANE if self.prompt.admit(request) else BUSY_LANE
        return INDEX_LANE if request.path in _INDEXED else None

    def handle(self, request: Request) -> Response:
        try:
            return super().handle(request)
        finally:
            self.prompt.done(request)  # a prompt admitted by lane() lets the next one in

    def _session(self, request: Request) -> Response:
        answer = super()._session(request)
        return json_response(answer.status, json.loads(answer.body) | self.prompt.session())

    def _catalog_page(self, request: Request) -> Response:
        return self._page(200, self.browse_page)

    def _catalog(self, request: Request) -> Response:
        try:
            query = CatalogQuery.from_params(request.query)
        except BadQuery as exc:
            return error_response(400, str(exc), field=exc.field)
        return json_response(200, self.index.query(query))

    def _facets(self, request: Request) -> Response:
        return json_response(200, self.index.facets())
