"""Reference models written as flat lists of layers."""
