"""Executors: what "apply these documents" means.

`kubernetes` applies to a cluster, `local` runs Jobs as processes on this machine, `dry-run` only
prints. The shared types are in `base.py`, the choice by the `EXECUTOR` setting in `factory.py`.
"""
