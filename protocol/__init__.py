"""What crosses a process: worker requests and deltas, prefill requests and results, KV events,
load reports, block hashing, sampling params. Imported by everyone; imports nothing of Tandem."""
