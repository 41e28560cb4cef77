"""The streaming verbs: extract and merge over row blocks, their options and the manifest."""
