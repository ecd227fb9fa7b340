"""Reporting: final labels, disputes, agreement, stratified estimates, plots."""
