// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";

/// @title ReputationRegistry: non-transferable, decaying scores per provider.
/// @notice A provider's score grows by the amount each settlement pays it (up to 2**128 - 1) and halves every
/// `halfLife` seconds (linearly between the halvings); a slash sets it to zero. Only the
/// escrow, set once by the deployer, updates scores. There is nothing to transfer.
contract ReputationRegistry {
    /// @dev score, updatedAt and settlements fill one slot (one write per settlement).
    struct Record {
        uint128 score; // as of `updatedAt`, before decay since then; saturates
        uint64 updatedAt;
        uint64 settlements;
        uint64 slashes;
    }

    uint64 public immutable halfLife;
    address public immutable deployer;
    address public escrow;

    mapping(address provider => Record) private _records;

    error ZeroHalfLife();
    error ZeroAddress();
    error NotDeployer(address caller);
    error EscrowAlreadySet(address escrow);
    error NotEscrow(address caller);

    event EscrowSet(address indexed escrow);
    event SettlementRecorded(address indexed provider, uint256 amount, uint256 score, uint64 settlements);
    event SlashRecorded(address indexed provider, uint256 previousScore, uint64 slashes);

    constructor(uint64 halfLife_) {
        if (halfLife_ == 0) revert ZeroHalfLife();
        halfLife = halfLife_;
        deployer = msg.sender;
    }

    /// @notice Names the escrow, the only writer; once, by the deployer.
    function setEscrow(address escrow_) external {
        if (msg.sender != deployer) revert NotDeployer(msg.sender);
        if (escrow != address(0)) revert EscrowAlreadySet(escrow);
        if (escrow_ == address(0)) revert ZeroAddress();
        escrow = escrow_;
        emit EscrowSet(escrow_);
    }

    modifier onlyEscrow() {
        if (msg.sender != escrow) revert NotEscrow(msg.sender);
        _;
    }

    function recordSettlement(address provider, uint256 amount) external onlyEscrow {
        Record storage r = _records[provider];
        uint256 score = _decayed(r.score, r.updatedAt);
        score = amount >= type(uint128).max - score ? type(uint128).max : score + amount;
        uint64 settlements = r.settlements + 1;
        r.score = uint128(score);
        r.updatedAt = uint64(block.timestamp);
        r.settlements = settlements;
        emit SettlementRecorded(provider, amount, score, settlements);
    }

    function recordSlash(address provider) external onlyEscrow {
        Record storage r = _records[provider];
        uint256 previous = _decayed(r.score, r.updatedAt);
        uint64 slashes = r.slashes + 1;
        r.score = 0;
        r.updatedAt = uint64(block.timestamp);
        r.slashes = slashes;
        emit SlashRecorded(provider, previous, slashes);
    }

    /// @notice The provider's score now, decay included.
    function scoreOf(address provider) external view returns (uint256) {
        Record storage r = _records[provider];
        return _decayed(r.score, r.updatedAt);
    }

    /// @notice Everything known of a provider; `score` is decayed to now.
    function recordOf(address provider) external view returns (Record memory record) {
        record = _records[provider];
        record.score = uint128(_decayed(record.score, record.updatedAt));
    }

    /// @dev score / 2^(elapsed / halfLife), then linearly towards the next halving.
    function _decayed(uint256 score, uint64 since) private view returns (uint256) {
        if (score == 0) return 0;
        uint256 elapsed = block.timestamp - since;
        uint256 halvings = elapsed / halfLife;
        if (halvings >= 256) return 0;
        score >>= halvings;
        uint256 rest = elapsed % halfLife;
        return score - Math.mulDiv(score, rest, 2 * uint256(halfLife));
    }
}
