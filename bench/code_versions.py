"""Cache keys made before the code version hashed behaviour (``bench.runner.behaviour``) hashed source text, comments
included. Each entry maps the behaviour digest of one set of modules, as they were when that changed, to the
text digest the published cache entries carry, so those entries keep their keys. An edit to the code of any of
these modules gives a digest not in the table, and so new keys, as it should; an edit to a comment does not.
Frozen: never add to it (``tests/test_cache.py`` checks that every published model keeps its key through it)."""

PUBLISHED: dict[str, str] = {
    "f3f353a71ded9ce92f150e2064e63db684a0d0f505691ed53b5855d2757803d5": "e74aa9dfbf961368c1c79209fb83a20fd5795ca86412715764c6bcd0ea225180",  # attacks.badnets + bench.models.fmnist_cnn
    "439a0f0a90706d640948801b32880fd7f5fc6392088a00842c229b7860bd333d": "da0403e18eb8a61f3a11274e09ad4c0723738b50cf791c9cdd5c5e10eef9ed82",  # attacks.badnets + bench.models.cifar_cnn
    "82b45f49ae1f6e2a956b83c6956970689db7621cd23ca5c260b17705a3b3a326": "f20e5241709cd4085bafad068beb122e4abe769aa9d63470be9483aff3833bef",  # attacks.badnets + bench.models.preact_resnet18
    "9777c1a9c5cb3cffb3154ec42552de7c7a0afae9083ac05d39f6dbc054fe156b": "f4967dd97926ea1911f4d70a36af1b82ca838bad5c91959d8cc9f6cda6c0ff5e",  # attacks.badnets + bench.models.wrn16_1
    "14cb914269541f37704f5dbd3e6e63065c3d617e1c103fdd2fa5e272f2300080": "f36d8ef62e59e21ffe26436b75d7db1962b6ac70e0402ac73e2ad9545bf3ce34",  # attacks.blended + bench.models.fmnist_cnn
    "a3ada181c506300d4b2d6729c87782d1a7f87176e061bd08661ea25e8b221469": "8b856be45a7f6ac675d0e8b4ed79cb8c965a003d4c22c5a6401ed66e8082bed1",  # attacks.blended + bench.models.cifar_cnn
    "54cdda0835acfaa77e148a10ebaefe80460e25b4881b8421fa4dd2b287c73df5": "6804973b536a456f237829058f8ef2626aca0d2e630e1139349763e00b2473d9",  # attacks.blended + bench.models.preact_resnet18
    "3d2ac92942693ea38bd0cdbd55f7282edaad0bb738fb0f5ec7bade365e2360a3": "35995253c253dec7421446e4412f3da735f06af7fa73505cdf8fd7e9382b746f",  # attacks.blended + bench.models.wrn16_1
    "fec580ad2007634d3e512abb6a866074d3130e5a2fbce3f78177edb61c72edec": "aeeaba2e214526a6f9dc660aafbd6335a542f0f41694e86d8a4d895d17fa0620",  # attacks.wanet + bench.models.fmnist_cnn
    "7053b17bcbb2d9d2fd07e90934ae3a67e94e5c25c1c83217ca0495f25d5f0738": "1cbbb672df4b0fbae2ef6ab5a6440d28fbec91e636cad0745a2a1e59d23ceae3",  # attacks.wanet + bench.models.cifar_cnn
    "d9ad82e15b4f3c95d3b5b070461a27d5d7acf90fd52ca3fbeb48ccfb34555083": "236eac7539500a0dc51fbde2d616c7231b929b526f57be193050aaa023225584",  # attacks.wanet + bench.models.preact_resnet18
    "536d056892abb291dd89593ff337f78fe9e54a90c5d27d25bd6079ddceb9fe0e": "6c1b743b6acf65ab89af0ad0df19b953607309c6cc95506d0e9c43f204969856",  # attacks.wanet + bench.models.wrn16_1
    "8277bdaf1b490e249422f4eb415a171949f4a650d7f1eb489ccbee98199b5269": "43b85fe9f44fb0d1268d126e6ecf0507f6ce61c1affd8e34ece24e95756f26ff",  # attacks.input_aware + bench.models.fmnist_cnn
    "1adeaf255cb8ed894549b016e09104589f522329741ab94bd7dff32bbcb36ad7": "ffd5a5211c317dc369a0e39581d61cf6495d3b26290df4ea031ab0ea12652802",  # attacks.input_aware + bench.models.cifar_cnn
    "34b82c1e1c0d4fad5f06b00892778770b295e9e9e8c2da102391f5126d62950f": "2adc70356394b3727a4c3ac640ffcfaf6eeaa3736fdfc7fa8239d7f519367a2a",  # attacks.input_aware + bench.models.preact_resnet18
    "57d9b40fb1a981d373f36d910f8d710dbf91e6d2461f709f49d949af3069fe61": "debbbe0803856ffb5419e8c77860bfe6dd6b0bf3be0e47121e17717e93e86ccb",  # attacks.input_aware + bench.models.wrn16_1
    "8baae80acb7a7f3183aea16a70aa0272d7ffe83dbe7f122c91c9f464189acad5": "506214b282e9fd1f0ec9dc791d69d30957488d86e60ff7b62606c5b9cafff515",  # attacks.none + bench.models.fmnist_cnn
    "54b0348c1b061a4bab4395ce04a16ffe4a0f7a9575abd2c0bf187a78e70bcf96": "d3caa9017ef107e467201fc675b4792694a38224465d1d8713a7e5ff11f4d83e",  # attacks.none + bench.models.cifar_cnn
    "76a383d7b2e12af83dde9d9f791e48848e1ebd9e5bb396e604d99f5d7f6cc6dd": "fe6dbe7966020991f24a4809acab5c61deb1adeb1af9882c4a3a7cec1c6aec17",  # attacks.none + bench.models.preact_resnet18
    "b1234bb22d5b299e997c29baacb6238b3a63adb196fa2e198f5851dfa0eb75ca": "a8a1bcd4c72fcdadfb4672d65fd0cab6aea1b44157b4e5c2fbd07bfe543c84f0",  # attacks.none + bench.models.wrn16_1
    "70a9dd1694730a696f5bcda20f79e7ab2ff0ae64f452dff53eafd2eb683ce112": "df1e0154e464a73d97e307a65db8685dbfa9f9d75b4032a94fcb87d64035866b",  # defenses.synthesis
    "44f5e01a41e6c2015d852a7ed7b18e4c62f848e6654637ee4b44df88bf64a53c": "41a599e01f8dd27b7461cc2e5020b5e8d7cf3e389bb7d0d1ccc43e54fe8ee9f6",  # defenses.reversal
}
