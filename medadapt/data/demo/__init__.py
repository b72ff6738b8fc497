"""What the embedded demos share: real anatomy (MNI152 from nilearn), smooth shapes and noise
for the SYNTHETIC lesions, and the marker that makes every demo build idempotent.

Each dataset builds its own demo (``medadapt/datasets/<name>/demo.py``, through
``Dataset.make_demo``), in its official layout, with a README.txt saying what is synthetic.
"""
