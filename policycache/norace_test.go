//go:build !race

package policycache

const raceEnabled = false
