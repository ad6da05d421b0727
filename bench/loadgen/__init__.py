"""`tandem bench`: a load generator and report for any OpenAI-compatible endpoint.

Modules, one idea each: `request` (data at the seams), `text` (prompt text of a given token
length), `workloads` (seeded request streams), `arrivals` (when sessions start), `client`
(one streaming request, timed), `runner` (one stage: arrivals x workload under a budget),
`stats` (percentiles, throughput, goodput), `server_metrics` (Prometheus scrape), `progress`
(live line on stderr), `report` / `plots` / `compare` (outputs), `cli` (`tandem bench`).
"""
