"""The data job: read, normalise, clean, scrub PII, deduplicate, tokenize and pack corpora."""
