"""Tools around the library: benchmarks, the demo, plain baselines, dataset writers, an embedded S3 server.

They sit on top of the library; the library never imports them (an import-linter contract).
"""
