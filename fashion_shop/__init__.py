"""The shop's tools, run as `fashion_mnist_cnn.py predict|finetune|export|review|report ...`.

    photos.py     photo preparation, as each kind of model was trained (no TensorFlow)
    models.py     what a model file is: which kind, how it is loaded, how it answers
    catalogue.py  a catalogue's CSV, continued after a stop, and the progress shown meanwhile
    predict.py    the predict command: photos prepared on every core, classified in batches
    beam.py       predict --runner: the same catalogue as an Apache Beam pipeline
    sorting.py    predict --sort-into: photos put in class folders, unsure ones marked
    review_page.py  the sorted catalogue's page: thumbnails, least sure first, and a figure
    review.py     the review command: a sorted catalogue checked in the browser, a key a photo
    review_server.py  its local server: the queue, the photos, each decision a file move
    review_app.html/.js  its page
    folders.py    class folders as finetune reads them, and photos prepared in one process
    finetune.py   the finetune command: a model adapted to a shop's labelled photos
    backbone.py   finetune --backbone: an ImageNet network and a new last layer
    doubts.py     finetune --backbone's doubtful.csv: photos probably in the wrong folder
    export.py     the export command: SavedModel, LiteRT and ONNX files, each proven
    runtimes.py   each exported format run in its own runtime
    report.py     the report command: a training run's curves, confusion matrix and mistakes

Each imports from fashion_mnist_cnn.py, the training script beside it, what it shares with
training (the classes, the run folder and its backup, the training loop).
"""
