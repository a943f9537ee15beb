//go:build race

package policycache

// raceEnabled: the race detector slows the scale test tenfold.
const raceEnabled = true
