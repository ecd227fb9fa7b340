"""Human review: the queue and decisions, the terminal review, the browser review (its
page is package data here)."""
