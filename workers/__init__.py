"""The Ray Serve shell around the engine: colocated, prefill and decode roles (`serve_worker`,
`prefill_worker`, `decode_worker`), the connectors that implement the engine's `KVConnector`
with `kvtransfer` (`disagg`), expert-parallel replica groups (`ep_replica`), metrics, the app's
composition root (`app`) and the pools' autoscaling policies (`autoscaling`). No engine logic."""
