package admin

import (
	"time"

	"stsmap/policycache"
)

// Entry is what the admin endpoint says of one cached domain. Times are
// UTC; zero ones are left out.
type Entry struct {
	Domain string `json:"domain"`
	// PolicyID is the TXT record's id, empty when no valid record was
	// found.
	PolicyID string `json:"policy_id,omitempty"`
	// Mode, MX and MaxAge (seconds) are the policy's; empty for an entry
	// without a policy.
	Mode   string   `json:"mode,omitempty"`
	MX     []string `json:"mx,omitempty"`
	MaxAge int64    `json:"max_age,omitempty"`
	// Fetched is when the policy was fetched or the outcome learned,
	// Expires when the entry stops being served, Checked when the TXT id
	// was last seen unchanged.
	Fetched time.Time `json:"fetched,omitzero"`
	Expires time.Time `json:"expires,omitzero"`
	Checked time.Time `json:"checked,omitzero"`
	// FailedID and FailedAt are the last failed refresh: the new id whose
	// policy could not be fetched (empty when the TXT lookup failed), and
	// when.
	FailedID string    `json:"failed_id,omitempty"`
	FailedAt time.Time `json:"failed_at,omitzero"`
	// LastUsed is when Postfix last asked for the domain, to the minute.
	LastUsed time.Time `json:"last_used,omitzero"`
	// Reason is a policycache.Reason: "policy", or why there is none.
	Reason string `json:"reason"`
	// Error says what failed, for an entry without a policy.
	Error string `json:"error,omitempty"`
}

// EntryOf renders a cache entry.
func EntryOf(e *policycache.Entry) Entry {
	out := Entry{
		Domain:   e.Domain,
		PolicyID: e.ID,
		Fetched:  utc(e.Fetched),
		Expires:  utc(e.Expires),
		Checked:  utc(e.Checked),
		FailedID: e.FailedID,
		FailedAt: utc(e.FailedAt),
		Reason:   string(e.Reason),
		Error:    e.Err,
	}
	if t := e.LastUsed.Load(); t > 0 {
		out.LastUsed = time.Unix(t, 0).UTC()
	}
	if p := e.Policy; p != nil {
		out.Mode, out.MX, out.MaxAge = string(p.Mode), p.MX, int64(p.MaxAge/time.Second)
	}
	return out
}

func utc(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return t.UTC()
}

// listBody is the answer to GET /cache.
type listBody struct {
	Entries []Entry `json:"entries"`
}

// PurgeResult is the answer to DELETE /cache/{domain}: the normalised
// domain, and Purged 1 when it was cached, 0 when not; and to DELETE
// /cache?all=1: Purged is the number of domains removed.
type PurgeResult struct {
	Domain string `json:"domain,omitempty"`
	Purged int    `json:"purged"`
}

// errorBody is the answer to a request that failed. Reason is
// policymap.SkipReason for a domain that can have no policy.
type errorBody struct {
	Error  string `json:"error"`
	Reason string `json:"reason,omitempty"`
}
