"""`fvlm export`: a trained model as a folder that plain transformers loads (trust_remote_code)."""
