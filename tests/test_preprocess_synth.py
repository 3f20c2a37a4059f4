import numpy as np

from rankshard.preprocess.sources.synth import class_images, labelled_images, natural_batch


def test_images_are_deterministic_and_labelled():
    a, la = labelled_images(3, seed=7)
    b, lb = labelled_images(3, seed=7)
    assert a.dtype == np.uint8 and a.shape == (30, 32, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert list(la[:10]) == list(range(10))
    assert not np.array_equal(a, labelled_images(3, seed=8)[0])


def test_spectra_decay_steeply_like_photos():
    x = natural_batch(4, size=(64, 64))
    for img in x:
        s = np.linalg.svd(img[0] - 0.0, compute_uv=False)
        # photos: the 10th singular value is a few percent of the first, the last is tiny
        assert s[9] / s[0] < 0.05
        assert s[-1] / s[0] < 1e-2


def test_non_square_sizes():
    assert class_images(3, 2, size=(40, 24)).shape == (2, 40, 24, 3)
