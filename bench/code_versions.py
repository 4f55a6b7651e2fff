"""The tables that let the code change, and move, without orphaning the published models or renaming a cell.

``PUBLISHED``: cache keys made before the code version hashed behaviour (``bdbench.runner.behaviour``) hashed source
text, comments included. Each entry maps the code version of one set of modules, as they were when that changed,
to the text digest the published cache entries carry, so those entries keep their keys. Frozen: never add to it
(``tests/test_cache.py`` checks that every published model keeps its key through it).

``ADMITTED``: an edit to a module's code that leaves every published model as it was (a new option whose default is
the old behaviour), admitted by name: the module's new behaviour digest stands for the one it replaces, so the
published keys hold. Only modules whose part in a published model the slow tier recomputes from that model's cache
entry may be admitted (``ADMISSIBLE``: the static attacks' poisoning and triggers, the metrics; in
``bdbench.attacks.base``, only its static poisoning, since the slow tier does not retrain a dynamic attack through
its training hooks; in ``bdbench.data``, what it hands a model: the decoded images and labels, the defender pool and
the budgets, whose digests as the publishing code read them are ``PUBLISHED_DATA``): ``tests/test_published.py``
draws each published model's poisoned indices again, compares its trigger with the cached one and recomputes its
undefended metrics from its weights, and reads each published data set again and compares it with its digest, all
with the current code. A module that shapes training itself (the loop, the augmentation, the models, the device) is
never admitted: only retraining would show that an edit left it alone. ``bdbench.runner.code_version`` reads both
tables.
"""

ADMISSIBLE = ("bdbench.attacks.base", "bdbench.attacks.badnets", "bdbench.attacks.blended", "bdbench.data",
              "bdbench.metrics")

# module -> {its behaviour digest after an admitted edit: the digest it stands for}; a chain of edits is followed.
ADMITTED: dict[str, dict[str, str]] = {
    "bdbench.attacks.base": {  # label_mode: all_to_one relabels to the target, as before; training hooks untouched
        "b80a4fd953e9f64799acc7ba69957f279549161ed75f31b85f6ecb1d0f44d86a":
            "8be8bb4a42ffe87e32abd9539af7328d639b4970556039de8b9fb3e9d74dbd51"},
    "bdbench.attacks.badnets": {
        # attack.pattern may name an image file; a list or null stamps as before
        "dcdf835d23dec602b5bac13e3071e1d2834552b6c76472df07b44507d7244dc6":
            "d8c40c365a01530eeb0fe6c5a4f59911e9e42adc2af8b2b7112c1b3f20f64ad4",
        # attack.label_mode, all_to_one as before
        "57af28c7f14972e70fc23c98a2af6d0fd2f190a96f2cc1cd302966411e5bca86":
            "dcdf835d23dec602b5bac13e3071e1d2834552b6c76472df07b44507d7244dc6"},
    "bdbench.attacks.blended": {
        # attack.image: null blends the seeded noise, as before
        "53e84a83e5bd2b9c19d152de038f30385e30df1a53f54bc4475881b10dab76d7":
            "5cb4286eb97e7459ec161aa369656226f67afee3d5f1abca43e2eb4ea75b887b",
        # attack.label_mode, all_to_one as before
        "e518a4f83b5d0b68fbf23a2105b7cc3eb8df68fd722245ae990e336c3b3a6c9d":
            "53e84a83e5bd2b9c19d152de038f30385e30df1a53f54bc4475881b10dab76d7"},
    "bdbench.data": {  # ImageFolder's decoded cache keyed by the files' contents, not names and sizes; same tensors
        "ee4c202bac1a3d3c312cbd2ae93986e930f4cb9598a36dc6552d55e6568197fe":
            "0078d38774a22102292ed42d98a7ffde5988526651346eb4983e090d7dc6eab3"},
    "bdbench.metrics": {  # ASR over backdoor labels per image: all-to-one's set and rate as before
        "20c60f0ce6bdad0a4e3646752af7ff2587ca997e8e57f4756058378cca8a444a":
            "473457c85a4f4455a4eaf0d361b1f7d026531eb4eb956faa5ed5210b29abd9c7"},
}

# Each published data set as the code that made its models read it (``tests/test_published.py`` ``data_digest``):
# train and test images and labels, the defender pool, the poisonable indices, the budgets k = 1, 10 and the whole
# pool for seeds 0-2. Computed with bdbench.data at 0078d387 (the published code), before its first admitted edit.
PUBLISHED_DATA: dict[str, str] = {
    "cifar10_jpeg": "294a74be773a851c78a64f2a61a0de1494896b0b7e48333f15998cce013091c7",
    "fashion_mnist": "f579af285057228c1a79df0778e9b424e6ef82dd96bfadac7228863e413e4328",
}

# The import names the published models and records were made under, before bdbench became one namespace: every
# digest reads a name as it was published (``published_name``: config ``_target_`` values in ``sha256_json``, module
# names and the package paths in a module's code in ``bdbench.runner.code_version``), so the rename re-keyed no model
# and renamed no cell; ``current_name`` reads a published record's ``_target_`` as today's code names it.
PUBLISHED_NAMES: dict[str, str] = {"bdbench.attacks": "attacks", "bdbench.defenses": "defenses", "bdbench": "bench"}


def published_name(name: str) -> str:
    """``bdbench.attacks.badnets.BadNets`` -> ``attacks.badnets.BadNets``, ``bdbench.data`` -> ``bench.data``; any
    other name as it is."""
    for now, then in PUBLISHED_NAMES.items():
        if name == now or name.startswith(now + "."):
            return then + name[len(now):]
    return name


def current_name(name: str) -> str:
    """The inverse of ``published_name``: a name from a record or a manifest written before the namespace."""
    for now, then in PUBLISHED_NAMES.items():
        if name == then or name.startswith(then + "."):
            return now + name[len(then):]
    return name


def renamed(node, rename=published_name):
    """A config (plain containers) with every ``_target_`` renamed: by default to its published name, what digests
    read; with ``current_name``, a published record's config as today's code builds it."""
    if isinstance(node, dict):
        return {k: rename(v) if k == "_target_" and isinstance(v, str) else renamed(v, rename)
                for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [renamed(v, rename) for v in node]
    return node


# Keys added to a component's config after models and records were published, at the value those were made with (a
# defense's ``candidates`` only adds to its report): left out of a poisoned model's cache key and a cell's identity,
# so the published ones keep theirs (a cell's identity leaves out every null already, ``bdbench.records.identity``).
NEUTRAL: dict[str, dict[str, object]] = {"attack": {"image": None, "label_mode": "all_to_one"},
                                         "defense": {"candidates": [0.0, 0.9, 0.05]}}

PUBLISHED: dict[str, str] = {
    "fa0828f6955c0cdfdf2730d4981cc958c6c5fea30d858f31ac00cb2e9f941b30": "e74aa9dfbf961368c1c79209fb83a20fd5795ca86412715764c6bcd0ea225180",  # bdbench.attacks.badnets + bdbench.models.fmnist_cnn
    "4cb395892b6430d4c1d193786dfb0d5d46e68f7efedc81c9fb51b6e4726b5ce7": "da0403e18eb8a61f3a11274e09ad4c0723738b50cf791c9cdd5c5e10eef9ed82",  # bdbench.attacks.badnets + bdbench.models.cifar_cnn
    "fb4e6ae91f817129e18a5911d7ac87273f694602b51c1eacab94839c28cc2065": "f20e5241709cd4085bafad068beb122e4abe769aa9d63470be9483aff3833bef",  # bdbench.attacks.badnets + bdbench.models.preact_resnet18
    "e98807ce3250a3c9c8dc24fb544e7160aa4b271b801b0e4a3f42696b3c123ad4": "f4967dd97926ea1911f4d70a36af1b82ca838bad5c91959d8cc9f6cda6c0ff5e",  # bdbench.attacks.badnets + bdbench.models.wrn16_1
    "ab396c250aad2f7317972746fba594880fc620c07375920a025d988c8810b993": "f36d8ef62e59e21ffe26436b75d7db1962b6ac70e0402ac73e2ad9545bf3ce34",  # bdbench.attacks.blended + bdbench.models.fmnist_cnn
    "54d6024e09540529008d5f88230d1c1f4292c4b9af229e17eac1e85a91e1af03": "8b856be45a7f6ac675d0e8b4ed79cb8c965a003d4c22c5a6401ed66e8082bed1",  # bdbench.attacks.blended + bdbench.models.cifar_cnn
    "8ad248219ea3b2e4cafd85762e73e5b7f69f8485e396dadcd3dd2a80aa88e793": "6804973b536a456f237829058f8ef2626aca0d2e630e1139349763e00b2473d9",  # bdbench.attacks.blended + bdbench.models.preact_resnet18
    "d60c0652dc57b4fcea6f625f428752491b407c3188674213a34bef77a8ce86b3": "35995253c253dec7421446e4412f3da735f06af7fa73505cdf8fd7e9382b746f",  # bdbench.attacks.blended + bdbench.models.wrn16_1
    "faf2c72a087e4c9686e6897f3beedbd194ebe3221c5be9b6e3d9110f6322836c": "aeeaba2e214526a6f9dc660aafbd6335a542f0f41694e86d8a4d895d17fa0620",  # bdbench.attacks.wanet + bdbench.models.fmnist_cnn
    "41324c922f1642918ad589a894a96d999fc49e200b623622291fb1e5b7a00ee3": "1cbbb672df4b0fbae2ef6ab5a6440d28fbec91e636cad0745a2a1e59d23ceae3",  # bdbench.attacks.wanet + bdbench.models.cifar_cnn
    "c780208fdadf71dbf44340136f9d02f092c1400d31f191396a934d7095253c21": "236eac7539500a0dc51fbde2d616c7231b929b526f57be193050aaa023225584",  # bdbench.attacks.wanet + bdbench.models.preact_resnet18
    "c143860cd017a67e84803d668f4780198848707c532b9aa9eab28ddc2b8c80d6": "6c1b743b6acf65ab89af0ad0df19b953607309c6cc95506d0e9c43f204969856",  # bdbench.attacks.wanet + bdbench.models.wrn16_1
    "01e50150f6f3dd217fd9418b071ac17f40f4a9b35e83242344f9532ee28686f9": "43b85fe9f44fb0d1268d126e6ecf0507f6ce61c1affd8e34ece24e95756f26ff",  # bdbench.attacks.input_aware + bdbench.models.fmnist_cnn
    "2ace37cff7dce57c4dfbeca46109e98c0b876aa3638d4362596a4e52fc3790eb": "ffd5a5211c317dc369a0e39581d61cf6495d3b26290df4ea031ab0ea12652802",  # bdbench.attacks.input_aware + bdbench.models.cifar_cnn
    "67957219c9cecee729116c805f094070271d60b9ced8dee27e11fd05e9f842e8": "2adc70356394b3727a4c3ac640ffcfaf6eeaa3736fdfc7fa8239d7f519367a2a",  # bdbench.attacks.input_aware + bdbench.models.preact_resnet18
    "0606a0d5fccdf4fc9dce5af5cf4ec4827432c30903d5d3a54630f420a1f5cb70": "debbbe0803856ffb5419e8c77860bfe6dd6b0bf3be0e47121e17717e93e86ccb",  # bdbench.attacks.input_aware + bdbench.models.wrn16_1
    "9476f4e542c3066702791a53a27c8f5815d7fceff618a6171e8263bccb245f3e": "506214b282e9fd1f0ec9dc791d69d30957488d86e60ff7b62606c5b9cafff515",  # bdbench.attacks.none + bdbench.models.fmnist_cnn
    "d2bc63e20871bac5588148e240f8d7181e51d8cbe9ab8cd21e0439ac127c94b9": "d3caa9017ef107e467201fc675b4792694a38224465d1d8713a7e5ff11f4d83e",  # bdbench.attacks.none + bdbench.models.cifar_cnn
    "fd7684182bfd9c68c566ecf4083f79ce8aa9ef94a010399e1fc77d38be6d36d0": "fe6dbe7966020991f24a4809acab5c61deb1adeb1af9882c4a3a7cec1c6aec17",  # bdbench.attacks.none + bdbench.models.preact_resnet18
    "73184984b548a99e089edb43162e85706c24add4be1a095894cf943eed8d6d7d": "a8a1bcd4c72fcdadfb4672d65fd0cab6aea1b44157b4e5c2fbd07bfe543c84f0",  # bdbench.attacks.none + bdbench.models.wrn16_1
    "82750e1738cf9c4a6b3c4b8e5f41088347be9359f4086e00bc969a5e18f67aea": "df1e0154e464a73d97e307a65db8685dbfa9f9d75b4032a94fcb87d64035866b",  # bdbench.defenses.synthesis
    "44fc16988dbf5ee6d279f2bb575da8ef5d3269f5c34021e25246ddedbacedaa2": "41a599e01f8dd27b7461cc2e5020b5e8d7cf3e389bb7d0d1ccc43e54fe8ee9f6",  # bdbench.defenses.reversal
}
