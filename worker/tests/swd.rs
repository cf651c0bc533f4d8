//! The sliced Wasserstein distance over Laplacian-pyramid patches against the NumPy
//! implementation in tools/reference/swd_reference.py: the pyramid, then each level's distance
//! from the same patch corners and directions, within 1e-5 (relative).

use std::collections::BTreeMap;
use std::path::Path;

use cohort_worker::swd::{self, SwdConfig};
use tch::{Kind, Tensor};

fn fixture() -> BTreeMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/swd_reference.safetensors");
    Tensor::read_safetensors(path).expect("fixture (regenerate with tools/reference/swd_reference.py)").into_iter().collect()
}

fn close(what: &str, ours: f64, expected: f64) {
    let error = (ours - expected).abs() / expected.abs().max(1e-12);
    assert!(error < 1e-5, "{what}: {ours} against NumPy's {expected} (relative error {error:e})");
}

#[test]
fn swd_matches_numpy() {
    let reference = fixture();
    let (real, fake) = (&reference["input.real"], &reference["input.fake"]);
    let levels = swd::resolutions(real.size()[2]);
    assert_eq!(levels, [64, 32, 16]);
    let real_pyramid = swd::laplacian_pyramid(real, levels.len());
    let fake_pyramid = swd::laplacian_pyramid(fake, levels.len());
    let mut distances = Vec::new();
    for index in 0..levels.len() {
        let expected_level = &reference[&format!("level{index}.pyramid.real")];
        let diff = (&real_pyramid[index] - expected_level).norm().double_value(&[]) / expected_level.norm().double_value(&[]);
        assert!(diff < 1e-5, "pyramid level {index}: relative error {diff:e}");
        let a = swd::descriptors(&real_pyramid[index], &reference[&format!("level{index}.positions.real")], 7);
        let b = swd::descriptors(&fake_pyramid[index], &reference[&format!("level{index}.positions.fake")], 7);
        let directions: Vec<Tensor> =
            (0..).map_while(|r| reference.get(&format!("level{index}.directions{r}")).map(Tensor::shallow_clone)).collect();
        assert_eq!(directions.len(), 2);
        let ours = swd::sliced_wasserstein(&a, &b, &directions);
        close(&format!("level {index}"), ours, reference[&format!("level{index}.swd")].double_value(&[]));
        distances.push(ours);
    }
    close("mean", distances.iter().sum::<f64>() / distances.len() as f64, reference["swd"].double_value(&[]));
}

#[test]
fn swd_is_deterministic_for_a_seed_and_orders_sets() {
    let reference = fixture();
    let (real, fake) = (&reference["input.real"], &reference["input.fake"]);
    let config = SwdConfig { patches_per_image: 32, directions: 64, ..Default::default() };
    let a = swd::swd(real, fake, 42, &config);
    assert_eq!(a, swd::swd(real, fake, 42, &config), "same seed, same figures");
    assert_eq!(a.levels.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [64, 32, 16]);
    // A set is closer to a slightly perturbed copy of itself than to a different kind of image.
    let near = real + Tensor::randn_like(real) * 0.01;
    let close_pair = swd::swd(real, &near.to_kind(Kind::Float), 42, &config);
    assert!(close_pair.mean < a.mean, "{} < {}", close_pair.mean, a.mean);
}
