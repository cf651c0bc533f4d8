//! Principal component analysis of small-dimensional codes (the seed's latent size is 4): the
//! covariance matrix's eigenvectors by Jacobi rotations, exact for symmetric matrices.

/// The top two principal components of `rows` (each of length `dim`) projected: one (x, y) per row.
pub fn project_2d(rows: &[Vec<f32>]) -> Vec<(f64, f64)> {
    let Some(dim) = rows.first().map(Vec::len) else {
        return vec![];
    };
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..dim).map(|j| rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / n).collect();
    let mut covariance = vec![vec![0.0; dim]; dim];
    for row in rows {
        for i in 0..dim {
            for j in 0..dim {
                covariance[i][j] += (f64::from(row[i]) - mean[i]) * (f64::from(row[j]) - mean[j]) / n.max(1.0);
            }
        }
    }
    let (values, vectors) = jacobi_eigen(covariance);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let component = |k: usize| -> Vec<f64> { (0..dim).map(|i| vectors[i][order[k.min(dim - 1)]]).collect() };
    let (first, second) = (component(0), component(1));
    rows.iter()
        .map(|row| {
            let centred: Vec<f64> = (0..dim).map(|j| f64::from(row[j]) - mean[j]).collect();
            let dot = |v: &[f64]| centred.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
            (dot(&first), if dim > 1 { dot(&second) } else { 0.0 })
        })
        .collect()
}

/// Eigenvalues and eigenvectors (as columns) of a symmetric matrix by cyclic Jacobi rotations.
fn jacobi_eigen(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect()).collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i][j] * a[i][j]).sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (above, from_q) = a.split_at_mut(q);
                for (apk, aqk) in above[p].iter_mut().zip(from_q[0].iter_mut()) {
                    let (x, y) = (*apk, *aqk);
                    *apk = c * x - s * y;
                    *aqk = s * x + c * y;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_direction_of_largest_spread() {
        // Points along (1, 1, 0, 0) with a little spread along (0, 0, 1, 0).
        let rows: Vec<Vec<f32>> = (0..50)
            .map(|i| {
                let t = i as f32 - 25.0;
                vec![t, t, 0.1 * (i % 3) as f32, 0.0]
            })
            .collect();
        let projected = project_2d(&rows);
        let spread_x: f64 = projected.iter().map(|p| p.0 * p.0).sum();
        let spread_y: f64 = projected.iter().map(|p| p.1 * p.1).sum();
        assert!(spread_x > 1000.0 * spread_y, "{spread_x} vs {spread_y}");
        // The first component is ±(1, 1)/√2: projections equal ±√2·(t − mean t), and mean t = −0.5.
        assert!((projected[0].0.abs() - 24.5 * 2f64.sqrt()).abs() < 1e-3, "{:?}", projected[0]);
        let (values, _) = jacobi_eigen(vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
        let mut values = values;
        values.sort_by(f64::total_cmp);
        assert!((values[0] - 1.0).abs() < 1e-12 && (values[1] - 3.0).abs() < 1e-12);
    }
}
