"""The datasets medadapt reads, one folder each (see README.md in this folder).

Each package here lists its datasets in ``DATASETS``; `medadapt.data.get_dataset` finds them.
"""
