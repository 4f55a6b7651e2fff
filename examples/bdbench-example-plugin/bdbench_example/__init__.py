"""An example bdbench plugin package: ``pip install`` it, then ``bdbench defense=head_ft attack=checkerboard``."""
