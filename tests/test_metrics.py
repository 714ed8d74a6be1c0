"""The metrics (metrics.py): hand-computed examples; parity with ALBEF's itm_eval and
pycocoevalcap."""
import inspect
import math
import random
import shutil

import numpy as np
import pytest
import torch

from metrics import (accuracy, bleu, bleu4, caption_scores, chance_recall, cider_d, format_recall,
                     oracle_recall, ptb_tokenize, recall_at_k, vqa_accuracy, vqa_score)


# -----------------------------------------------------------------------------
# retrieval recall@k

def scores_from_order(order):
    """A score row in which the candidates rank in the given order (first = highest)."""
    row = np.zeros(len(order))
    row[order] = np.arange(len(order), 0, -1)
    return row


def place(gt, rank, n):
    """A score row over n candidates where candidate `gt` has 0-based rank `rank`."""
    others = [c for c in range(n) if c != gt]
    return scores_from_order(others[:rank] + [gt] + others[rank:])


def test_recall_by_hand():
    # 5 images, 12 captions, several per image
    img2txt = [[0, 1, 2], [3, 4], [5, 6, 7], [8], [9, 10, 11]]
    txt2img = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4]
    rest = lambda *first: list(first) + [t for t in range(12) if t not in first]
    scores_i2t = np.stack([
        scores_from_order(rest(2)),                 # img0: t2 first -> rank 0 (R@1, R@5, R@10)
        scores_from_order(rest(0, 5, 4, 3)),        # img1: t4 at 2, t3 at 3 -> rank 2 (R@5, R@10)
        scores_from_order(rest(0, 1, 2, 3, 4, 8, 7)),  # img2: t7 at 6 -> rank 6 (R@10 only)
        scores_from_order(rest(*range(8), *range(9, 12))),  # img3: t8 last -> rank 11 (none)
        scores_from_order(rest(0, 1, 2, 3, 11)),    # img4: t11 at 4 -> rank 4 (R@5 boundary, R@10)
    ])
    # txt: R@1 = 1/5 = 20, R@5 = 3/5 = 60, R@10 = 4/5 = 80, mean = 160/3
    img_ranks = [0, 0, 1, 0, 2, 0, 4, 3, 0, 1, 0, 0]
    scores_t2i = np.stack([place(g, r, 5) for g, r in zip(txt2img, img_ranks)])
    # img: R@1 = 7/12 (seven ranks 0), R@5 = R@10 = 12/12 (only 5 images),
    #      mean = (175/3 + 200) / 3 = 775/9
    expected = dict(txt_r1=20.0, txt_r5=60.0, txt_r10=80.0, txt_r_mean=160 / 3,
                    img_r1=175 / 3, img_r5=100.0, img_r10=100.0, img_r_mean=775 / 9)
    expected["r_mean"] = (160 / 3 + 775 / 9) / 2
    for s_i2t, s_t2i, i2t in [(scores_i2t, scores_t2i, img2txt),
                             (torch.tensor(scores_i2t), torch.tensor(scores_t2i),
                              dict(enumerate(img2txt)))]:
        result = recall_at_k(s_i2t, s_t2i, i2t, txt2img)
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-9), key


def albef_itm_eval(scores_i2t, scores_t2i, img2txt, txt2img):
    """ALBEF's itm_eval (its retrieval script's), transcribed: a loop over queries with argsort."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return dict(txt_r1=tr[0], txt_r5=tr[1], txt_r10=tr[2], img_r1=ir[0], img_r5=ir[1],
                img_r10=ir[2], txt_r_mean=sum(tr) / 3, img_r_mean=sum(ir) / 3,
                r_mean=(sum(tr) / 3 + sum(ir) / 3) / 2)


def test_recall_matches_albef_itm_eval():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 6, size=40)           # 1..5 captions for each of 40 images
    txt2img = np.repeat(np.arange(40), counts)
    img2txt = [list(np.flatnonzero(txt2img == i)) for i in range(40)]
    # correlated with the truth so that the recalls are neither 0 nor 100
    truth = (txt2img[None, :] == np.arange(40)[:, None]).astype(float)  # (40, T)
    scores_i2t = truth + rng.normal(size=truth.shape)
    scores_t2i = truth.T + rng.normal(size=truth.T.shape)
    expected = albef_itm_eval(scores_i2t, scores_t2i, img2txt, txt2img)
    result = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img)
    assert 0 < result["txt_r1"] < result["txt_r10"] < 100
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def test_recall_ties_and_errors():
    # all scores equal: ties go to the lower index, as a stable sort; only image 0 owns caption 0
    result = recall_at_k(np.zeros((3, 6)), np.zeros((6, 3)), [[0, 1], [2, 3], [4, 5]],
                         [0, 0, 1, 1, 2, 2])
    assert result["txt_r1"] == pytest.approx(100 / 3)  # ranks 0, 2, 4
    assert result["img_r1"] == pytest.approx(100 / 3)  # ranks 0, 0, 1, 1, 2, 2
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3)), np.zeros((3, 2)), [[0, 1, 2], []], [0, 0, 0])
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), [[0], [1, 2]], [0, 1, 1])


def test_chance_recall_by_hand_and_by_sampling():
    # 2 images with 2 captions each: T = 4 texts, N = 2 images
    chance = chance_recall([[0, 1], [2, 3]])
    assert chance["txt_r1"] == pytest.approx(100 * (1 - math.comb(2, 1) / math.comb(4, 1)))
    assert chance["txt_r5"] == chance["txt_r10"] == 100.0      # a top 5 of 4 texts holds them all
    assert chance["img_r1"] == 50.0 and chance["img_r5"] == 100.0
    assert chance["r_mean"] == pytest.approx((chance["txt_r_mean"] + chance["img_r_mean"]) / 2)
    # the mean recall of random scores approaches it (uneven caption counts, 7 images)
    img2txt = {0: [0], 1: [1, 2, 3], 2: [4, 5], 3: [6], 4: [7, 8, 9, 10], 5: [11], 6: [12, 13]}
    txt2img = [i for i, caps in img2txt.items() for _ in caps]
    expected = chance_recall(img2txt)
    g = torch.Generator().manual_seed(0)
    runs = [recall_at_k(torch.rand(7, 14, generator=g), torch.rand(14, 7, generator=g), img2txt,
                        txt2img) for _ in range(400)]
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert np.mean([r[key] for r in runs]) == pytest.approx(expected[key], abs=3.0), key


def test_oracle_recall_by_hand():
    # image 0 owns captions 0, 1 and caption 2 is also true of it; image 1 owns caption 2 and
    # caption 0 is also true of it
    truth = [[True, True, True], [True, False, True]]
    oracle = oracle_recall(truth, [[0, 1], [2]])
    # text retrieval: image 0 ranks its 3 true captions first, 2 of them its own: a hit at 1 in
    # 2 of 3 orders; image 1 ranks captions 0 and 2 first: 1 in 2. At 5 and 10 always a hit
    assert oracle["txt_r1"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)          # 58.33
    assert oracle["txt_r5"] == oracle["txt_r10"] == 100.0
    # image retrieval: caption 0 is true of both images (1/2), caption 1 of image 0 only (1),
    # caption 2 of both (1/2)
    assert oracle["img_r1"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)      # 66.67
    assert oracle["img_r5"] == oracle["img_r10"] == 100.0
    assert oracle["r_mean"] == pytest.approx(87.5)          # ((58.33 + 200) / 3 + (66.67 + 200) / 3) / 2


def test_oracle_recall_between_perfect_and_chance():
    img2txt = {0: [0], 1: [1, 2, 3], 2: [4, 5], 3: [6], 4: [7, 8, 9, 10], 5: [11], 6: [12, 13]}
    own = np.zeros((7, 14), bool)
    for i, caps in img2txt.items():
        own[i, caps] = True
    # captions true only of their own image: a perfect ranking
    assert all(v == 100.0 for v in oracle_recall(own, img2txt).values())
    # every caption true of every image: the oracle knows nothing and ranks at random
    everything = oracle_recall(np.ones((7, 14), bool), img2txt)
    assert everything == pytest.approx(chance_recall(img2txt))
    # and by sampling the oracle's random order among the true candidates, on a mixed truth
    rng = np.random.default_rng(0)
    truth = own | (rng.random((7, 14)) < 0.3)
    txt2img = [i for i, caps in img2txt.items() for _ in caps]
    runs = []
    for _ in range(400):
        scores = truth + rng.random((7, 14)) * 0.5        # the true ones first, random among them
        runs.append(recall_at_k(scores, scores.T, img2txt, txt2img))
    expected = oracle_recall(truth, img2txt)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert np.mean([r[key] for r in runs]) == pytest.approx(expected[key], abs=3.0), key
    with pytest.raises(ValueError):                  # an image's own caption must be true of it
        oracle_recall(np.zeros((7, 14), bool), img2txt)


def test_format_recall():
    model = dict(txt_r1=12.5, txt_r5=40, txt_r10=60, img_r1=10, img_r5=35, img_r10=55, r_mean=35.4)
    chance = chance_recall([[0, 1], [2, 3]])
    lines = format_recall(model, chance, "zero-shot").splitlines()
    assert lines[0] == "zero-shot" and lines[1].split() == ["txt_r1", "txt_r5", "txt_r10",
                                                           "img_r1", "img_r5", "img_r10", "r_mean"]
    assert lines[2].split() == ["model", "12.50", "40.00", "60.00", "10.00", "35.00", "55.00",
                                "35.40"]
    assert lines[3].split()[0] == "chance" and len(lines) == 4
    assert len(format_recall(model).splitlines()) == 3                 # no chance row
    lines = format_recall(model, None, "zero-shot", oracle=dict(model, r_mean=70.8)).splitlines()
    assert lines[3].split()[0] == "oracle" and lines[4] == "R mean 35.40 is 50.0% of the " \
        "oracle's 70.80"

# -----------------------------------------------------------------------------
# VQA and classification accuracy

def test_vqa_score():
    answers = ["two"] * 4 + ["2"] * 2 + ["three"] + ["four"] * 3
    assert vqa_score("five", answers) == 0.0          # 0 matches
    assert vqa_score("three", answers) == pytest.approx(1 / 3)  # 1 match
    assert vqa_score("2", answers) == pytest.approx(2 / 3)      # 2 matches
    assert vqa_score("four", answers) == 1.0          # 3 matches
    assert vqa_score("two", answers) == 1.0           # 4 matches: capped at 1
    preds = ["five", "three", "2", "four", "two"]
    assert vqa_accuracy(preds, [answers] * 5) == pytest.approx((0 + 1 / 3 + 2 / 3 + 1 + 1) / 5)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(torch.tensor([2, 0, 1]), np.array([2, 0, 1])) == 1.0
    assert accuracy(["entailment", "neutral"], ["entailment", "contradiction"]) == 0.5
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])


# -----------------------------------------------------------------------------
# captioning: BLEU and CIDEr-D

def test_bleu_identical_is_one():
    refs = [["a red cube left of a blue ball", "a cube and a ball"]]
    scores = bleu(["a red cube left of a blue ball"], refs)
    assert scores == pytest.approx([1.0] * 4, abs=1e-9)  # up to the 1e-9 smoothing of 0/0


def test_bleu_by_hand():
    candidates = ["the cat sat on the mat", "a big dog runs"]
    references = [["the cat is on the mat", "there is a cat on the mat"],
                  ["a big dog runs fast", "a big dog runs in the park"]]
    # sentence 1 (6 words), clipped by the max count in any reference:
    #   1-grams the x2, cat, on, mat match; sat does not          -> 5 of 6
    #   2-grams the cat, on the, the mat match; cat sat, sat on not -> 3 of 5
    #   3-grams only "on the mat"                                   -> 1 of 4
    #   4-grams none                                                -> 0 of 3
    #   closest reference length: 6 (lengths 6 and 7)
    # sentence 2 (4 words) is a prefix of both references: 4/4, 3/3, 2/2, 1/1;
    #   closest reference length: 5 (lengths 5 and 8)
    # corpus: p1 = 9/10, p2 = 6/8, p3 = 3/6, p4 = 1/4; c = 10, r = 11, BP = exp(1 - 11/10)
    p = [9 / 10, 6 / 8, 3 / 6, 1 / 4]
    bp = math.exp(1 - 11 / 10)
    expected = [bp * math.prod(p[:k]) ** (1 / k) for k in (1, 2, 3, 4)]
    assert bleu(candidates, references) == pytest.approx(expected, rel=1e-8)
    assert bleu4(candidates, references) == pytest.approx(expected[3], rel=1e-8)
    # dict input, upper case folded to lower case
    as_dict = bleu4({"x": candidates[0].upper(), "y": candidates[1]},
                    {"x": references[0], "y": references[1]})
    assert as_dict == pytest.approx(expected[3], rel=1e-8)


def test_bleu_closest_length_breaks_ties_to_shorter():
    # 4 words, references of 3 and 5 words are equally close: the shorter (3) is used, so no
    # brevity penalty; the candidate matches the 5-word reference fully
    assert bleu(["a b c d"], [["x y z", "a b c d e"]]) == pytest.approx([1.0] * 4, abs=1e-9)
    # with references of 5 and 6 words the closest is 5: BP = exp(1 - 5/4)
    assert bleu(["a b c d"], [["a b c d e", "a b c d e f"]])[0] == pytest.approx(
        math.exp(1 - 5 / 4), rel=1e-8)


def test_cider_d_by_hand():
    candidates = ["cat cat", "a dog on"]
    references = [["a cat"], ["a dog"]]
    # 2 images: idf = log 2 - log(max(1, df)); "a" is in both images' references (idf 0);
    # cat, dog, "a cat", "a dog" in one (idf L = log 2); unseen n-grams have df 0 (idf L too)
    # image 1, candidate "cat cat" vs "a cat":
    #   1-grams: cand {cat: 2L}, ref {a: 0, cat: L}; clipped dot = min(2L, L) * L = L^2,
    #            norms 2L and L -> cos 1/2 (plain CIDEr without clipping would give 1)
    #   2-grams: cand {cat cat: L}, ref {a cat: L} -> 0; 3- and 4-grams: none -> 0
    #   same length -> penalty 1; score = 10 * (1/2 + 0 + 0 + 0) / 4 = 1.25
    # image 2, candidate "a dog on" vs "a dog":
    #   1-grams: cand {a: 0, dog: L, on: L} (norm sqrt2 L), ref {a: 0, dog: L} (norm L) -> 1/sqrt2
    #   2-grams: cand {a dog: L, dog on: L}, ref {a dog: L} -> 1/sqrt2; 3-grams: ref empty -> 0
    #   lengths 3 vs 2 -> penalty exp(-1 / (2 * 6^2)); score = 10 * (2 / sqrt2) / 4 * penalty
    score2 = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider_d(candidates, references) == pytest.approx((1.25 + score2) / 2, rel=1e-10)
    # identical 2-word captions: 1- and 2-gram cosines are 1, no 3- or 4-grams -> 10 * 2/4 = 5
    assert cider_d(["a cat", "a dog"], references) == pytest.approx(5.0, rel=1e-10)
    # a single image: every idf is log 1 - log 1 = 0
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


def random_captions(num=50, seed=0):
    """~50 candidates with 3-5 references each over a small vocabulary, so that n-grams up to 4
    match often; half the candidates are edited references (high overlap), half are random."""
    rnd = random.Random(seed)
    vocab = "a the red blue green cube ball cone left right of above below big small and".split()
    sentence = lambda: " ".join(rnd.choice(vocab) for _ in range(rnd.randint(2, 12)))
    candidates, references = [], []
    for i in range(num):
        refs = [sentence() for _ in range(rnd.randint(3, 5))]
        if i % 2:
            words = rnd.choice(refs).split()
            words[rnd.randrange(len(words))] = rnd.choice(vocab)
            cand = " ".join(words + [rnd.choice(vocab)] * rnd.randint(0, 2))
        else:
            cand = sentence()
        candidates.append(cand)
        references.append(refs)
    return candidates, references


def test_bleu_matches_pycocoevalcap():
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    candidates, references = random_captions()
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert 0.05 < expected[3] < 0.95
    assert bleu(candidates, references) == pytest.approx(expected, abs=1e-12)


def test_cider_d_matches_pycocoevalcap():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    scorer_module = pytest.importorskip("pycocoevalcap.cider.cider_scorer")
    # pycocoevalcap's "Cider" is CIDEr-D: its scorer holds vrama91's clipping and Gaussian length
    # penalty. Check that, so this parity test cannot silently compare against plain CIDEr.
    source = inspect.getsource(scorer_module.CiderScorer)
    assert "min(vec_hyp[n][ngram], vec_ref[n][ngram])" in source and "self.sigma**2" in source
    candidates, references = random_captions()
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    expected, _ = cider_module.Cider().compute_score(gts, res)
    assert 0.1 < expected < 5
    assert cider_d(candidates, references) == pytest.approx(expected, abs=1e-9)


# -----------------------------------------------------------------------------
# the COCO caption evaluation's cleaning (pycocoevalcap's Java PTB tokenizer, in Python)

PTB_CASES = {   # caption -> what pycocoevalcap's PTBTokenizer and punctuation list make of it
    "A man's dog isn't running.": "a man 's dog is n't running",
    "Two dogs (brown) play in the park!": "two dogs -lrb- brown -rrb- play in the park",
    "A black/white cat on a well-dressed man's lap": "a black/white cat on a well-dressed man 's lap",
    'He said "hello" to them...': "he said hello to them",
    "A cannot gonna wanna gotta test": "a can not gon na wan na got ta test",
    "It's 3.5 feet, and 1,000 people; wow: ok?": "it 's 3.5 feet and 1,000 people wow ok",
    "A dog -- running - fast": "a dog running fast",
    "Mr. Smith and Dr. Who at 5 p.m. in the U.S.": "mr. smith and dr. who at 5 p.m. in the u.s.",
    "a $5 bill & 50% off @home #tag": "a $ 5 bill & 50 % off @home #tag",
    "cats' toys and the 90's": "cats toys and the 90 's",
    "I'll we'd you're they've I'm": "i 'll we 'd you 're they 've i 'm",
    "don't can't won't shouldn't": "do n't ca n't wo n't should n't",
    "An 'odd' quote `here'": "an odd quote here",
    "A plate of food with  broccoli,carrots.": "a plate of food with broccoli carrots",
    "a {curly} [square] <angle>": "a -lcb- curly -rcb- -lsb- square -rsb- <angle>",
    "A cat.Another sentence": "a cat.another sentence",
    "a b.c d.": "a b.c d.",
    "o'clock O'Neil": "o'clock o'neil",
    "hi!!! wow?!": "hi !!! wow ?!",
    "end..": "end",
    "hello--world semi;colon x:y 10:30": "hello world semi colon x y 10:30",
    "a cat(s) here, a b&w photo": "a cat -lrb- s -rrb- here a b & w photo",
    "the '90s style": "the '90s style",
    "A woman riding a bike down the street, next to a bus.":
        "a woman riding a bike down the street next to a bus",
    "Skiers on the slope... at night!": "skiers on the slope at night",
    "A 10-year-old boy plays baseball.": "a 10-year-old boy plays baseball",
}


PTB_MORE = [   # more captions for the comparison with the Java tokenizer
    'A  Man   with spaces ',
    'a tennis-player.',
    'e-mail t-shirt x-ray',
    'A 2x4 board * star',
    'Café naïve résumé',
    'the end .',
    "a ''double'' quote",
    'U.S.A. is big',
    "it's 10:30 am",
    "A 'S word",
    "a dog's.",
    "what's up?",
    "a kids' room",
    "an 'I love NY' shirt",
    "some 'quoted text'.",
    "It is 5 o'clock.",
    'a dog,',
    'A.',
    "dog's, cat's",
    '(a) test',
    'hello--world',
    'semi;colon x:y',
    'a cat(s) here',
    'a b&w photo',
    'I LOVE NY',
    'he\'s "the best".',
    'A man, a plan, a canal: Panama!',
    'two men on bikes ; one is red',
    "a woman's hat ( red )",
    "Can't stop won't stop",
    'a 3-4 year old',
    'a cup of coffee?!?',
    'A group of people standing around a kitchen.',
    '"A sign that says \'stop\' on a pole."',
    "A person's hand holding a cell-phone (iPhone).",
    "There's a cat on the couch; it's sleeping.",
    'The bus is red/white and blue.',
    "people at the St. Patrick's day parade",
]


def test_ptb_tokenize_by_hand():
    for caption, tokens in PTB_CASES.items():
        assert " ".join(ptb_tokenize(caption)) == tokens, caption


def test_ptb_tokenize_matches_pycocoevalcap_java():
    """These cases and more through pycocoevalcap's own tokenizer (Stanford CoreNLP 3.4.1, Java)."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    if shutil.which("java") is None:
        pytest.skip("no java to run pycocoevalcap's PTBTokenizer")
    captions = list(PTB_CASES) + PTB_MORE
    out = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [out[i][0] for i in range(len(captions))] == [" ".join(ptb_tokenize(c)) for c in captions]


def test_caption_scores_clean_both_sides():
    refs = [["A dog's ball.", "The dog's red ball!"], ["Two (2) cats, sleeping.", "Cats sleep."]]
    cands = ["A dog's ball", "two cats sleeping"]
    clean = [["a dog 's ball", "the dog 's red ball"], ["two -lrb- 2 -rrb- cats sleeping", "cats sleep"]]
    want = {"bleu4": bleu4(["a dog 's ball", "two cats sleeping"], clean),
            "cider_d": cider_d(["a dog 's ball", "two cats sleeping"], clean)}
    assert caption_scores(cands, refs) == pytest.approx(want)
    assert want["cider_d"] > 0
