//! The noise vectors a generator is sampled with: the options `coordinator generate` takes and
//! forwards to `worker generate`, which draws them. One definition, so that the two commands
//! cannot drift apart.

use std::ffi::OsString;
use std::path::PathBuf;

/// Where a grid's noise vectors come from (clap arguments, flattened into both commands).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LatentArgs {
    /// Random vectors to draw (one column each).
    #[arg(long, default_value_t = 16)]
    pub count: i64,
    /// Seeds the random vectors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw the vectors of this latent file (one vector a line) instead.
    #[arg(long, conflicts_with = "interpolate")]
    pub latent: Option<PathBuf>,
    /// Write the vectors used to this latent file.
    #[arg(long)]
    pub save_latent: Option<PathBuf>,
    /// One row from the first vector of latent file A to the first of latent file B.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub interpolate: Option<Vec<PathBuf>>,
    /// Images of the interpolation, both ends included.
    #[arg(long, default_value_t = 8)]
    pub steps: i64,
}

/// What `worker generate` prints on stdout and `coordinator generate` reads back: the shape of
/// the grid it drew.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GridShape {
    /// Rows (one per class for a conditional generator).
    pub rows: i64,
    /// Columns.
    pub columns: i64,
    /// The class of each row (conditional generators).
    pub row_classes: Vec<i64>,
}

impl GridShape {
    /// The line `worker generate` prints.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("integers serialize")
    }
}

impl LatentArgs {
    /// The same options as command-line arguments, for the command that draws them.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--count".into(),
            self.count.to_string().into(),
            "--seed".into(),
            self.seed.to_string().into(),
            "--steps".into(),
            self.steps.to_string().into(),
        ];
        if let Some(file) = &self.latent {
            args.extend(["--latent".into(), file.into()]);
        }
        if let Some(file) = &self.save_latent {
            args.extend(["--save-latent".into(), file.into()]);
        }
        if let Some(ends) = &self.interpolate {
            args.push("--interpolate".into());
            args.extend(ends.iter().map(OsString::from));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        latents: LatentArgs,
    }

    fn parse(args: &[&str]) -> Result<LatentArgs, clap::Error> {
        Command::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.latents)
    }

    /// What the coordinator forwards parses back to the same options, whichever are set.
    #[test]
    fn forwarded_arguments_parse_back_to_the_same_options() {
        for args in [
            &[][..],
            &["--count", "5", "--seed", "7"],
            &["--latent", "a b.txt", "--save-latent", "out.txt"],
            &["--interpolate", "a.txt", "b.txt", "--steps", "3"],
        ] {
            let options = parse(args).unwrap();
            let forwarded: Vec<String> = options.to_args().into_iter().map(|a| a.into_string().unwrap()).collect();
            let forwarded: Vec<&str> = forwarded.iter().map(String::as_str).collect();
            assert_eq!(parse(&forwarded).unwrap(), options, "{args:?} → {forwarded:?}");
        }
        assert!(parse(&["--latent", "a", "--interpolate", "b", "c"]).is_err(), "one source of vectors");
    }
}
