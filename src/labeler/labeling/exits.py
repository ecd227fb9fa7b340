"""How a labeling ends, as an exit status:

0    every planned feature has a judgment from every judge (or waits for a budget)
2    a judge cannot work (a rejected key, an unknown model, a model that does not load),
     another labeler holds the run, or bad input; one line says which
3    the labeling ended with failed features (listed by reason; a re-run retries them)
130  interrupted (Ctrl-C or SIGTERM); everything finished is kept
"""

from __future__ import annotations

from labeler.labeling.store import LabelStore

EXIT_FAILURES = 3


def failures_by_reason(store: LabelStore, judges: list[str]) -> list[tuple[str, str, int]]:
    """(judge, failure kind, count) of the planned features left failed, most first."""
    marks = ",".join("?" * len(judges))
    rows = store.conn.execute(
        f"""SELECT j.judge, substr(j.reason, 1, instr(j.reason || ':', ':') - 1) AS kind,
                   count(*) AS n
            FROM judgments j JOIN planned p USING (feature_id)
            WHERE j.status = 'failed' AND j.judge IN ({marks})
            GROUP BY j.judge, kind ORDER BY n DESC, j.judge, kind""",
        judges,
    )
    return [(str(judge), str(kind), int(n)) for judge, kind, n in rows]
