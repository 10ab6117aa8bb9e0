"""Data: readers of every supported format into canonical samples, chat templates and labels, images, training datasets, caches, packing and sampling."""
