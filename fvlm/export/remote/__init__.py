"""The modeling code an exported folder carries (configuration_fvlm.py, modeling_fvlm.py).

`fvlm export` copies these two files verbatim into the folder; transformers imports them from there
under `trust_remote_code=True`. They import torch and transformers only, never fvlm: the folder
must load on a machine without this package. fvlm imports them too, to build the exported model
and write its weights.
"""
