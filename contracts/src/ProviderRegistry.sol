// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @notice What the registry asks the escrow: where slashed stake goes.
interface IFeeRecipient {
    function feeRecipient() external view returns (address);
}

/// @title ProviderRegistry: payout addresses bound to peer ids, stake, unbonding and slashing.
/// @notice A provider registers from its payout address with its libp2p peer id (one peer id
/// per address and one address per peer id), stakes the token, and unstakes in two steps:
/// `requestUnstake` moves stake to unbonding, `withdrawUnstaked` pays it out `unbondingDelay`
/// seconds after the latest request. Unbonding stake is still slashable. Only the escrow slashes.
contract ProviderRegistry is ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct Provider {
        bytes peerId;
        uint256 stake; // active stake: counts towards minStake
        uint256 unbonding; // requested out, not yet withdrawn; still slashable
        uint64 unbondingReadyAt; // when `unbonding` may be withdrawn
        bool registered;
        bool slashed;
    }

    IERC20 public immutable token;
    uint256 public immutable minStake;
    uint64 public immutable unbondingDelay;
    address public immutable deployer;
    address public escrow;

    mapping(address provider => Provider) private _providers;
    mapping(bytes32 peerIdHash => address provider) private _payoutOf;

    error ZeroAddress();
    error ZeroAmount();
    error EmptyPeerId();
    error NotDeployer(address caller);
    error EscrowAlreadySet(address escrow);
    error NotEscrow(address caller);
    error AlreadyRegistered(address provider);
    error PeerIdTaken(bytes32 peerIdHash, address provider);
    error NotRegistered(address provider);
    error ProviderSlashed(address provider);
    error InsufficientStake(uint256 requested, uint256 available);
    error NothingUnbonding(address provider);
    error UnbondingNotOver(uint64 readyAt);

    event EscrowSet(address indexed escrow);
    event Registered(address indexed provider, bytes32 indexed peerIdHash, bytes peerId);
    event Staked(address indexed provider, uint256 amount, uint256 stake);
    event UnstakeRequested(address indexed provider, uint256 amount, uint256 stake, uint256 unbonding, uint64 readyAt);
    event Unstaked(address indexed provider, uint256 amount);
    event Slashed(address indexed provider, uint256 amount, address indexed recipient);

    constructor(IERC20 token_, uint256 minStake_, uint64 unbondingDelay_) {
        if (address(token_) == address(0)) revert ZeroAddress();
        token = token_;
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        deployer = msg.sender;
    }

    /// @notice Names the escrow, the only one that slashes; once, by the deployer.
    function setEscrow(address escrow_) external {
        if (msg.sender != deployer) revert NotDeployer(msg.sender);
        if (escrow != address(0)) revert EscrowAlreadySet(escrow);
        if (escrow_ == address(0)) revert ZeroAddress();
        escrow = escrow_;
        emit EscrowSet(escrow_);
    }

    /// @notice Binds msg.sender (the payout address) to `peerId`, for good.
    function register(bytes calldata peerId) external {
        if (peerId.length == 0) revert EmptyPeerId();
        Provider storage p = _providers[msg.sender];
        if (p.registered) revert AlreadyRegistered(msg.sender);
        bytes32 peerIdHash = keccak256(peerId);
        address holder = _payoutOf[peerIdHash];
        if (holder != address(0)) revert PeerIdTaken(peerIdHash, holder);
        p.registered = true;
        p.peerId = peerId;
        _payoutOf[peerIdHash] = msg.sender;
        emit Registered(msg.sender, peerIdHash, peerId);
    }

    function stake(uint256 amount) external nonReentrant {
        Provider storage p = _live(msg.sender);
        if (amount == 0) revert ZeroAmount();
        uint256 total = p.stake + amount;
        p.stake = total;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Staked(msg.sender, amount, total);
    }

    /// @notice Moves `amount` of active stake to unbonding; the delay restarts for all of it.
    function requestUnstake(uint256 amount) external {
        Provider storage p = _live(msg.sender);
        if (amount == 0) revert ZeroAmount();
        if (amount > p.stake) revert InsufficientStake(amount, p.stake);
        p.stake -= amount;
        p.unbonding += amount;
        uint64 readyAt = uint64(block.timestamp) + unbondingDelay;
        p.unbondingReadyAt = readyAt;
        emit UnstakeRequested(msg.sender, amount, p.stake, p.unbonding, readyAt);
    }

    function withdrawUnstaked() external nonReentrant {
        Provider storage p = _live(msg.sender);
        uint256 amount = p.unbonding;
        if (amount == 0) revert NothingUnbonding(msg.sender);
        if (block.timestamp < p.unbondingReadyAt) revert UnbondingNotOver(p.unbondingReadyAt);
        p.unbonding = 0;
        token.safeTransfer(msg.sender, amount);
        emit Unstaked(msg.sender, amount);
    }

    /// @notice Takes all of `provider`'s stake, active and unbonding, to the escrow's fee
    /// recipient and marks it slashed for good. Only the escrow, on proof of fraud.
    function slash(address provider) external nonReentrant returns (uint256 amount) {
        if (msg.sender != escrow) revert NotEscrow(msg.sender);
        Provider storage p = _live(provider);
        amount = p.stake + p.unbonding;
        p.stake = 0;
        p.unbonding = 0;
        p.slashed = true;
        address recipient = IFeeRecipient(escrow).feeRecipient();
        if (amount > 0) token.safeTransfer(recipient, amount);
        emit Slashed(provider, amount, recipient);
    }

    /// @notice Registered, never slashed, and at least `minStake` of active stake.
    function isActive(address provider) external view returns (bool) {
        Provider storage p = _providers[provider];
        return p.registered && !p.slashed && p.stake >= minStake;
    }

    function isSlashed(address provider) external view returns (bool) {
        return _providers[provider].slashed;
    }

    /// @notice The payout address bound to keccak256(peerId), or zero.
    function payoutOf(bytes32 peerIdHash) external view returns (address) {
        return _payoutOf[peerIdHash];
    }

    function peerIdOf(address provider) external view returns (bytes memory) {
        return _providers[provider].peerId;
    }

    /// @notice Active stake (what counts towards minStake).
    function stakeOf(address provider) external view returns (uint256) {
        return _providers[provider].stake;
    }

    /// @notice Stake waiting to unbond and when it may be withdrawn.
    function unbondingOf(address provider) external view returns (uint256 amount, uint64 readyAt) {
        Provider storage p = _providers[provider];
        return (p.unbonding, p.unbondingReadyAt);
    }

    function _live(address provider) private view returns (Provider storage p) {
        p = _providers[provider];
        if (!p.registered) revert NotRegistered(provider);
        if (p.slashed) revert ProviderSlashed(provider);
    }
}
