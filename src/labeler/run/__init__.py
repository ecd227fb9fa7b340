"""The run folder as the labeler reads it: feature records, examples, negatives, and
the record types every stage shares."""
