//! The sweep file's tests, and the files the planner's and the pruner's tests share.

use super::check::check_axis;
use super::*;

/// The seed's grid over 4 folds (shared with the planner's tests).
pub(crate) const GOOD: &str = r#"
name = "t"
[dataset]
format = "idx"
path = "data"
[model]
kind = "dae"
[cv]
folds = 4
epochs = 2
[cv.grid]
lr = [1e-3, 1e-4]
weight_decay = [1e-5, 1e-6]
batch_size = [256, 512]
"#;

fn error_of(text: &str) -> String {
    SweepFile::parse(text, "s.toml").unwrap_err().to_string()
}

#[test]
fn parses_the_seed_grid() {
    let sweep = SweepFile::parse(GOOD, "s.toml").unwrap();
    let configs = sweep.cv_configs();
    assert_eq!(configs.len(), 8);
    assert_eq!((configs[0].lr, configs[0].batch_size), (1e-3, 256));
    assert_eq!((configs[7].lr, configs[7].weight_decay, configs[7].batch_size), (1e-4, 1e-6, 512));
    assert_eq!(sweep.noise.std, 0.3);
    assert_eq!(sweep.model.latent, 4);
}

#[test]
fn unknown_key_names_line_column_and_key() {
    let err = error_of(&GOOD.replace("epochs = 2", "epochs = 2\nepoch = 3"));
    assert!(err.starts_with("s.toml: "), "{err}");
    assert!(err.contains("line 11, column 1"), "{err}");
    assert!(err.contains("unknown field `epoch`"), "{err}");
}

#[test]
fn wrong_type_is_named() {
    let err = error_of(&GOOD.replace("folds = 4", "folds = \"four\""));
    assert!(err.contains("line 9") && err.contains("folds"), "{err}");
}

#[test]
fn range_errors_name_the_key() {
    assert!(error_of(&GOOD.replace("folds = 4", "folds = 1")).contains("cv.folds: 1 must be at least 2"));
    assert!(error_of(&GOOD.replace("lr = [1e-3, 1e-4]", "lr = []")).contains("cv.grid.lr: an empty grid axis"));
    assert!(error_of(&GOOD.replace("lr = [1e-3, 1e-4]", "lr = [-1.0]")).contains("cv.grid.lr: -1 must be"));
    assert!(error_of(&GOOD.replace("[cv.grid]", "[cv.random]\nsamples = 3\n[cv.grid]")).contains("either [cv.grid] or [cv.random]"));
    assert!(error_of(&GOOD.replace("[cv.grid]\n", "[cv.random]\nsamples = 3\nlr = { min = 1.0, max = 0.1 }\n[cv.grid.unused]\n"))
        .contains("unknown field"));
    assert!(error_of(&GOOD.replace("kind = \"dae\"", "kind = \"vae\"")).contains("model.kind"));
    assert!(error_of(&GOOD.replace("folds = 4", "folds = 400000")).contains("more than the limit of 1000000"));
    let big = SweepFile::parse(&GOOD.replace("folds = 4", "folds = 4000"), "s.toml").unwrap();
    assert!(big
        .check_trial_limit("s.toml", 10_000)
        .unwrap_err()
        .to_string()
        .contains("expands to 32000 trials, more than the limit of 10000"));
    big.check_trial_limit("s.toml", 50_000).unwrap();
}

/// The seed's whole first experiment.
pub(crate) const SEED: &str = r#"
name = "seed"
seed = 7
[dataset]
format = "idx"
path = "data"
[augment]
copies = 1
[model]
kind = "dae"
[cv]
folds = 4
epochs = 20
[cv.grid]
lr = [1e-3, 1e-4]
weight_decay = [1e-5, 1e-6]
batch_size = [256, 512]
[final]
epochs = 40
[finetune]
epochs = 10
"#;

/// The seed's second experiment.
pub(crate) const GAN: &str = r#"
name = "gan"
[dataset]
format = "nifti"
path = "mri"
[model]
kind = "wgan-gp"
[train]
epochs = 80
"#;

#[test]
fn parses_the_whole_seed_pipeline_with_its_defaults() {
    let sweep = SweepFile::parse(SEED, "s.toml").unwrap();
    let augment = sweep.augment.unwrap();
    assert_eq!((augment.rotate_deg, augment.translate, augment.shear_deg), (15.0, 0.1, 10.0));
    let finetune = sweep.finetune.unwrap();
    assert_eq!((finetune.lr_head, finetune.lr_encoder, finetune.weight_decay, finetune.batch_size), (1e-3, 1e-4, 1e-5, 256));
    assert_eq!(sweep.final_stage.unwrap().epochs, 40);
}

#[test]
fn parses_the_gan_with_the_seed_recipe() {
    let sweep = SweepFile::parse(GAN, "g.toml").unwrap();
    assert!(sweep.is_gan());
    let train = sweep.train.unwrap();
    assert_eq!((train.lr, train.beta1, train.beta2, train.critic_steps, train.gp_lambda), (1e-4, 0.0, 0.9, 5, 10.0));
    assert_eq!(sweep.model.widths, [1024, 512, 256, 128]);
    assert_eq!(sweep.dataset.image_size, 64);
}

#[test]
fn gan_image_sizes_set_the_stages_and_conditional_needs_classes() {
    let sized = |size: u32, widths: &str| {
        GAN.replace("path = \"mri\"", &format!("path = \"mri\"\nimage_size = {size}"))
            .replace("kind = \"wgan-gp\"", &format!("kind = \"wgan-gp\"\nwidths = {widths}"))
    };
    for (size, widths) in [(32, "[64, 32, 16]"), (64, "[64, 32, 16, 8]"), (128, "[64, 32, 16, 8, 8]")] {
        let sweep = SweepFile::parse(&sized(size, widths), "g").unwrap();
        assert_eq!(
            sweep.model.widths.len(),
            match size {
                32 => 3,
                64 => 4,
                _ => 5,
            }
        );
        assert_eq!(sweep.train.unwrap().eval_every, 10);
    }
    let err = SweepFile::parse(&sized(128, "[64, 32, 16, 8]"), "g").unwrap_err().to_string();
    assert!(err.contains("model.widths: 4 widths make 64×64 images; image_size 128 needs 5"), "{err}");
    let err = SweepFile::parse(&sized(96, "[64, 32, 16, 8]"), "g").unwrap_err().to_string();
    assert!(err.contains("dataset.image_size: 96 must be 32, 64 or 128"), "{err}");
    let err = SweepFile::parse(&GAN.replace("kind = \"wgan-gp\"", "kind = \"wgan-gp\"\nconditional = true"), "g").unwrap_err().to_string();
    assert!(err.contains("model.conditional: a conditional WGAN-GP takes its classes from an \"image-folder\""), "{err}");
    let folder = GAN
        .replace("format = \"nifti\"", "format = \"image-folder\"")
        .replace("kind = \"wgan-gp\"", "kind = \"wgan-gp\"\nconditional = true");
    assert!(SweepFile::parse(&folder, "g").unwrap().model.conditional);
}

#[test]
fn a_judge_needs_a_conditional_gan_that_evaluates_and_a_sha256() {
    let sha = "ab".repeat(32);
    let folder = |model: &str, train: &str| {
        GAN.replace("format = \"nifti\"", "format = \"image-folder\"")
            .replace("kind = \"wgan-gp\"", &format!("kind = \"wgan-gp\"\n{model}"))
            .replace("epochs = 80", &format!("epochs = 80\n{train}"))
    };
    let judged = SweepFile::parse(&folder("conditional = true", &format!("judge = \"{sha}\"")), "g").unwrap();
    assert_eq!(judged.train.unwrap().judge.as_deref(), Some(sha.as_str()));
    let err = SweepFile::parse(&folder("", &format!("judge = \"{sha}\"")), "g").unwrap_err().to_string();
    assert!(err.contains("g: train.judge: ") && err.contains("needs [model] conditional = true"), "{err}");
    let err = SweepFile::parse(&folder("conditional = true", &format!("judge = \"{sha}\"\neval_every = 0")), "g").unwrap_err().to_string();
    assert!(err.contains("train.judge: ") && err.contains("needs train.eval_every > 0"), "{err}");
    let err = SweepFile::parse(&folder("conditional = true", "judge = \"final.safetensors\""), "g").unwrap_err().to_string();
    assert!(err.contains("train.judge: \"final.safetensors\" is not a SHA-256"), "{err}");
}

#[test]
fn stages_must_fit_the_model() {
    let err = SweepFile::parse(&GAN.replace("[train]", "[cv]\nfolds = 2\nepochs = 1\n[train]"), "g").unwrap_err().to_string();
    assert!(err.contains("g: cv: [cv] belongs to model.kind = \"dae\""), "{err}");
    let err = SweepFile::parse(&SEED.replace("[final]\nepochs = 40", ""), "s").unwrap_err().to_string();
    assert!(err.contains("finetune: [finetune] starts from [final]"), "{err}");
    let err = SweepFile::parse(&SEED.replace("epochs = 40", "epochs = 40\nlr = 0.1"), "s").unwrap_err().to_string();
    assert!(err.contains("final: lr, weight_decay and batch_size come from the cross-validation winner"), "{err}");
    let err = SweepFile::parse(&format!("{GAN}[distributed]\nreplicas = 100\n"), "g").unwrap_err().to_string();
    assert!(err.contains("distributed.replicas: 100 must be 1 to 64"), "{err}");
    let err =
        SweepFile::parse(&format!("{}[distributed]\nreplicas = 3\n", GAN.replace("epochs = 80", "epochs = 80\nbatch_size = 64")), "g")
            .unwrap_err()
            .to_string();
    assert!(err.contains("train.batch_size: 64 must split evenly over 3 replicas"), "{err}");
    let err = SweepFile::parse(&format!("{GAN}[distributed]\nbackend = \"mpi\"\n"), "g").unwrap_err().to_string();
    assert!(err.contains("distributed.backend: \"mpi\" is not a backend"), "{err}");
    let err = SweepFile::parse(&GAN.replace("[train]", "[train]\nbeta2 = 1.0"), "g").unwrap_err().to_string();
    assert!(err.contains("train.beta2: 1 must be within [0, 1)"), "{err}");
    let err = SweepFile::parse(&GAN.replace("format = \"nifti\"", "format = \"idx\""), "g").unwrap_err().to_string();
    assert!(err.contains("dataset.format"), "{err}");
}

#[test]
fn an_autoencoder_trains_final_and_finetune_data_parallel() {
    let sweep = SweepFile::parse(&format!("{SEED}[distributed]\nreplicas = 2\n"), "s").unwrap();
    assert_eq!(sweep.distributed.map(|d| (d.replicas, d.backend)), Some((2, "auto".to_string())));
    let without_final = SEED.replace("[final]\nepochs = 40\n[finetune]\nepochs = 10\n", "");
    let err = SweepFile::parse(&format!("{without_final}[distributed]\nreplicas = 2\n"), "s").unwrap_err().to_string();
    assert!(err.contains("distributed: data-parallel training applies to [final] and [finetune]: add [final]"), "{err}");
    let err = SweepFile::parse(&format!("{SEED}[distributed]\nreplicas = 3\n"), "s").unwrap_err().to_string();
    assert!(err.contains("cv.grid.batch_size: batch size 256 of the final training must split evenly over 3 replicas"), "{err}");
    let err =
        SweepFile::parse(&format!("{}[distributed]\nreplicas = 2\n", SEED.replace("[finetune]\n", "[finetune]\nbatch_size = 33\n")), "s")
            .unwrap_err()
            .to_string();
    assert!(err.contains("finetune.batch_size: 33 must split evenly over 2 replicas"), "{err}");
    let random = SEED.replace(
        "[cv.grid]\nlr = [1e-3, 1e-4]\nweight_decay = [1e-5, 1e-6]\nbatch_size = [256, 512]",
        "[cv.random]\nsamples = 8\nbatch_size = { values = [64, 96] }",
    );
    let err = SweepFile::parse(&format!("{random}[distributed]\nreplicas = 64\n"), "s").unwrap_err().to_string();
    assert!(err.contains("cv.random.batch_size: batch size 96 of the final training must split evenly over 64 replicas"), "{err}");
    let final_only = SEED
        .replace("[cv]\nfolds = 4\nepochs = 20\n[cv.grid]\nlr = [1e-3, 1e-4]\nweight_decay = [1e-5, 1e-6]\nbatch_size = [256, 512]\n", "");
    assert!(
        SweepFile::parse(&format!("{final_only}[distributed]\nreplicas = 4\n"), "s").is_ok(),
        "the default batch size 256 splits over 4"
    );
    let err = SweepFile::parse(
        &format!("{}[distributed]\nreplicas = 4\n", final_only.replace("epochs = 40", "epochs = 40\nbatch_size = 30")),
        "s",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("final.batch_size: batch size 30 of the final training must split evenly over 4 replicas"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

    /// Hostile input: any text parses or fails with an error naming the file; never a panic.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        if let Err(error) = SweepFile::parse(&text, "fuzz.toml") {
            proptest::prop_assert!(error.to_string().starts_with("fuzz.toml: "));
        }
    }

    /// Valid files with a line replaced by a random key/value pair: parse or fail cleanly.
    #[test]
    fn edited_sweeps_never_panic(line in 0usize..40, key in "[a-z_.]{1,12}", value in "[-0-9a-z.\\[\\], \"]{0,16}") {
        let mut lines: Vec<String> = SEED.lines().map(str::to_string).collect();
        let index = line % lines.len();
        lines[index] = format!("{key} = {value}");
        let _ = SweepFile::parse(&lines.join("\n"), "fuzz.toml");
    }
}

#[test]
fn a_long_offending_line_is_cut_around_the_error() {
    // 200 KB on the line of the error: the message keeps 200 characters of it, about the column.
    let padding = "x".repeat(100_000);
    let text = GOOD.replace("epochs = 2", &format!("epochs = 2\nnote = \"{padding}\" oops {padding}"));
    let err = error_of(&text);
    assert!(err.len() < 1000, "{} bytes: {}", err.len(), &err[..1000.min(err.len())]);
    assert!(err.starts_with("s.toml: TOML parse error at line 11, column 100011"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 5, "{err}");
    let shown = lines[2].strip_prefix("11 | ").unwrap();
    assert!(shown.starts_with('…') && shown.ends_with('…'), "{err}");
    assert_eq!(shown.chars().count(), MAX_ECHOED_LINE_CHARS + 2, "{err}");
    let caret = lines[3].chars().position(|c| c == '^').unwrap();
    assert_eq!(lines[2].chars().nth(caret), Some('o'), "the caret still points at the error: {err}");

    // A long value echoed in the message itself is cut too.
    let err = error_of(&GOOD.replace("folds = 4", &format!("folds = \"{padding}\"")));
    assert!(err.len() < 1000, "{} bytes", err.len());
    assert!(err.contains("line 9") && err.contains('…'), "{err}");

    // Short lines are echoed as toml writes them.
    let err = error_of(&GOOD.replace("epochs = 2", "epochs = 2 oops"));
    assert!(!err.contains('…') && err.contains("10 | epochs = 2 oops"), "{err}");
    let err = error_of(&GOOD.replace("kind = \"dae\"", &format!("kind = \"{padding}\"")));
    assert!(err.len() < 1000 && err.contains("model.kind: \"xxx"), "{} bytes", err.len());
}

#[test]
fn augmented_copies_and_latent_sizes_are_bounded() {
    SweepFile::parse(&SEED.replace("copies = 1", "copies = 16"), "s").unwrap();
    let err = SweepFile::parse(&SEED.replace("copies = 1", "copies = 17"), "s").unwrap_err().to_string();
    assert!(err.contains("s: augment.copies: 17 must be at most 16"), "{err}");
    SweepFile::parse(&SEED.replace("kind = \"dae\"", "kind = \"dae\"\nlatent = 4096"), "s").unwrap();
    let err = SweepFile::parse(&SEED.replace("kind = \"dae\"", "kind = \"dae\"\nlatent = 4097"), "s").unwrap_err().to_string();
    assert!(err.contains("s: model.latent: 4097 must be at most 4096"), "{err}");
    let err = error_of(&GOOD.replace("batch_size = [256, 512]", "batch_size = [256, 512]\nlatent = [8, 100000]"));
    assert!(err.contains("cv.grid.latent: 100000 must be at most 4096"), "{err}");
    let random = GOOD.replace(
        "[cv.grid]\nlr = [1e-3, 1e-4]\nweight_decay = [1e-5, 1e-6]\nbatch_size = [256, 512]",
        "[cv.random]\nsamples = 4\nlatent = { min = 5000, max = 6000 }",
    );
    let err = error_of(&random);
    assert!(err.contains("cv.random.latent: ") && err.contains("must be at most 4096"), "{err}");
}

#[test]
fn batch_larger_than_a_fold_is_refused() {
    let sweep = SweepFile::parse(GOOD, "s.toml").unwrap();
    let err = sweep.check_against_dataset("s.toml", 600).unwrap_err().to_string();
    assert!(err.contains("batch size 512 is larger than a fold's 450 training samples"), "{err}");
    sweep.check_against_dataset("s.toml", 8000).unwrap();
}

#[test]
fn axes_are_checked() {
    assert!(check_axis(&Axis::Range { min: 1.0f64, max: 0.5, log: false }).unwrap_err().contains("must not exceed"));
    assert!(check_axis(&Axis::Range { min: 0.0f64, max: 0.5, log: true }).unwrap_err().contains("log range needs min > 0"));
    assert!(check_axis(&Axis::<f64>::Values { values: vec![] }).is_err());
}
