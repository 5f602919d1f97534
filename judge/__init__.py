"""The judge of generated images: a CIFAR-10 classifier the project trains (classifier.py, its
config and optimiser in config.py) and the scores both image generators report with it
(image_eval.py: FID and class accuracy). A task of its own above shared/, which knows no images'
classes; the generators' scripts and tests call it, never shared."""
