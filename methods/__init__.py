"""Pure method logic, one module per paper: SPIN's pairs, S3FT's buckets, LLM2LLM's eligibility, AFT's
propose-and-aggregate. Ray-free and I/O-free: plain rows in, plain rows out, so a test runs them in milliseconds.

May import: data (the row helpers). Nothing that starts Ray, loads a model or writes a file.
"""
