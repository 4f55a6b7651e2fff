"""Cache keys made before the code version hashed behaviour (``bench.runner.behaviour``) hashed source text, comments
included. Each entry maps the behaviour digest of one set of modules, as they were when that changed, to the
text digest the published cache entries carry, so those entries keep their keys. An edit to the code of any of
these modules gives a digest not in the table, and so new keys, as it should; an edit to a comment does not.
Frozen: never add to it (``tests/test_cache.py`` checks that every published model keeps its key through it)."""

PUBLISHED: dict[str, str] = {
    "dc48117bf762b6baf0c75da3b11e4112ea21d682a1a33ceb7076ab1eed154031": "e74aa9dfbf961368c1c79209fb83a20fd5795ca86412715764c6bcd0ea225180",  # attacks.badnets + bench.models.fmnist_cnn
    "41a5e420836b2f70fd7e68761926c91f1a32e1becf22de4e6f873b400be34a15": "da0403e18eb8a61f3a11274e09ad4c0723738b50cf791c9cdd5c5e10eef9ed82",  # attacks.badnets + bench.models.cifar_cnn
    "4f9451097333651873692af1044fe1a6a9ded5f1ca98325eb08b03e602a0bbd9": "f20e5241709cd4085bafad068beb122e4abe769aa9d63470be9483aff3833bef",  # attacks.badnets + bench.models.preact_resnet18
    "b51ee50d21f91211e672023055b5e1787b58a0a02a5406666f8b2bdec7a7782b": "f4967dd97926ea1911f4d70a36af1b82ca838bad5c91959d8cc9f6cda6c0ff5e",  # attacks.badnets + bench.models.wrn16_1
    "ad2d0400ef015615f83871fa4f23d95d911d4b53ec810ba373cf9cbf65427ac6": "f36d8ef62e59e21ffe26436b75d7db1962b6ac70e0402ac73e2ad9545bf3ce34",  # attacks.blended + bench.models.fmnist_cnn
    "145a15e819a89bc00c1ecb405417f9d3fad99f066d9458d444bc48a723992a0f": "8b856be45a7f6ac675d0e8b4ed79cb8c965a003d4c22c5a6401ed66e8082bed1",  # attacks.blended + bench.models.cifar_cnn
    "7f5f56c5f45e31dbcafe917525455d6a7db3c5adde34e31631ed095622e1406b": "6804973b536a456f237829058f8ef2626aca0d2e630e1139349763e00b2473d9",  # attacks.blended + bench.models.preact_resnet18
    "152fe25192e4edcf81140660a0cabe4823dec82a26b4f5b57d6a8e53e03d4484": "35995253c253dec7421446e4412f3da735f06af7fa73505cdf8fd7e9382b746f",  # attacks.blended + bench.models.wrn16_1
    "c999603747ab2ef036cada9d604ba83c1d1564d5448e91fe9942078871de7b89": "aeeaba2e214526a6f9dc660aafbd6335a542f0f41694e86d8a4d895d17fa0620",  # attacks.wanet + bench.models.fmnist_cnn
    "bc2a5b79410e341909cca688bd821310706c035ca2d95a32381c065f08502ca8": "1cbbb672df4b0fbae2ef6ab5a6440d28fbec91e636cad0745a2a1e59d23ceae3",  # attacks.wanet + bench.models.cifar_cnn
    "3c6722254717bbf0a4d9373a43ad2ad406e4b85c21b8c635c5e4c3ab4103a33a": "236eac7539500a0dc51fbde2d616c7231b929b526f57be193050aaa023225584",  # attacks.wanet + bench.models.preact_resnet18
    "32a039d2f8af4269594c09f1d93f8c8a5f81d935608ef6ccc8c2279c02fef79a": "6c1b743b6acf65ab89af0ad0df19b953607309c6cc95506d0e9c43f204969856",  # attacks.wanet + bench.models.wrn16_1
    "fee6ba2ea99a073326ab4b8add11480c979859c12b2cd201fa6d07bfc2e1cb98": "43b85fe9f44fb0d1268d126e6ecf0507f6ce61c1affd8e34ece24e95756f26ff",  # attacks.input_aware + bench.models.fmnist_cnn
    "c0ac7d2899f628385b934a2188619e4c60cdd719f4c273f35fd5fe16944d4927": "ffd5a5211c317dc369a0e39581d61cf6495d3b26290df4ea031ab0ea12652802",  # attacks.input_aware + bench.models.cifar_cnn
    "846639aeb1e61a7b0623318bae1938399aea44f95e46719d05638d7b3adaab20": "2adc70356394b3727a4c3ac640ffcfaf6eeaa3736fdfc7fa8239d7f519367a2a",  # attacks.input_aware + bench.models.preact_resnet18
    "a69940e92356ec19dbf2b46a669e878988d23bb3525349f7cc91e7c7d43def39": "debbbe0803856ffb5419e8c77860bfe6dd6b0bf3be0e47121e17717e93e86ccb",  # attacks.input_aware + bench.models.wrn16_1
    "0ad22bbb167aebe40d5951aa3c5e5c0d862cb85b3a1dfdc33b6dba32bdac48a5": "506214b282e9fd1f0ec9dc791d69d30957488d86e60ff7b62606c5b9cafff515",  # attacks.none + bench.models.fmnist_cnn
    "17593f8c42937476faa287a3d5f3f82e912f3dae2ca4d9cf60bfe102fd85248e": "d3caa9017ef107e467201fc675b4792694a38224465d1d8713a7e5ff11f4d83e",  # attacks.none + bench.models.cifar_cnn
    "ec63a2c63321fc998a39b3f3d28b5da065fea7bfd740641a009b38e07bc3b682": "fe6dbe7966020991f24a4809acab5c61deb1adeb1af9882c4a3a7cec1c6aec17",  # attacks.none + bench.models.preact_resnet18
    "77f597df4cd0729f4e377b32673938ef30f6cf8f1f5923e7a6eb5691fe155db7": "a8a1bcd4c72fcdadfb4672d65fd0cab6aea1b44157b4e5c2fbd07bfe543c84f0",  # attacks.none + bench.models.wrn16_1
    "a649332c532a014b2cbc942f03addcaca09c56bf038d698bd5f0e3a0f048524c": "df1e0154e464a73d97e307a65db8685dbfa9f9d75b4032a94fcb87d64035866b",  # defenses.synthesis
    "de0b9e31cdec190eb504b7863b24e5cc96f7caddea56d543b44ceab2301742d2": "41a599e01f8dd27b7461cc2e5020b5e8d7cf3e389bb7d0d1ccc43e54fe8ee9f6",  # defenses.reversal
}
